"""LaMM-mini: a real-chemistry pre-training corpus in miniature (``lamm-ds make-corpus``).

Subsets (:data:`~lamm_ds.corpus.recipes.SUBSETS`): MMFF94s conformers of drug-like MOSES molecules
(unlabelled, the largest, as PubChem3D is in the paper), GFN2-xTB-labelled off-equilibrium drug-like
conformers (QMugs-like) and small molecules far from equilibrium (QM7-X/Transition1x-like),
EMT-labelled slabs with adsorbates (OC20-like; energy+forces and energy-only), and periodic
GFN1-xTB bulk/defect cells across the periodic table. Needs the ``corpus`` extra (RDKit, tblite,
molsets' SMILES file); see docs/corpus.md.
"""

from lamm_ds.corpus.build import CorpusError, coverage_table, make_corpus
from lamm_ds.corpus.deps import MissingExtraError
from lamm_ds.corpus.recipes import SCALES, SUBSETS

__all__ = ["CorpusError", "MissingExtraError", "SCALES", "SUBSETS", "coverage_table", "make_corpus"]
