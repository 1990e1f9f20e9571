"""The source formats ``lamm-ds ingest`` reads: a registry (``--format NAME``) and sniffing.

Each format says which energy it stores (``--energy-kind`` picks one where a source holds several:
total vs atomization / formation / reference-corrected), the unit it comes in, and the level of
theory written to the manifest when ``--level-of-theory`` is not given. Readers live in one module
per family (hdf5_formats, sdf, mptrj, aselmdb; readers.py for ASE and fairchem) and are imported
only when used, so a missing optional package only matters for its own format.
"""

from __future__ import annotations

import gzip
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lamm_ds.ingest.readers import IngestError, LabelKeys, source_kind
from lamm_ds.structure import Structure


@dataclass(frozen=True)
class EnergyChoice:
    """One energy a source holds: where (``key``), in which unit, what it means, at which theory."""

    key: str
    unit: str
    meaning: str
    level: str = "unknown"


@dataclass(frozen=True)
class FormatSpec:
    name: str
    summary: str
    reader: str  # "module:function", imported on first use
    energies: dict[str, EnergyChoice] = field(default_factory=dict)  # the first is the default
    label_keys: bool = False  # --energy-key / --forces-key / --stress-key name source keys
    unlabelled: bool = False  # the source holds no labels by design
    pickle: bool = False  # records are pickles: needs --trust-pickle

    def chosen(self, kind: str | None, keys: LabelKeys) -> tuple[str | None, EnergyChoice | None]:
        """As :meth:`energy`, but a format whose labels --energy-key can rename (ANI-1x's methods)
        reports the key given, at the level of theory known for it."""
        kind, choice = self.energy(kind)
        if choice is not None and self.label_keys and keys.energy:
            choice = EnergyChoice(keys.energy, choice.unit, "energy under --energy-key",
                                  LEVELS_BY_KEY.get(keys.energy, "unknown"))
        return kind, choice

    def energy(self, kind: str | None) -> tuple[str | None, EnergyChoice | None]:
        """(kind, choice) for ``--energy-kind`` (None: the default); an IngestError for a kind the
        format does not hold."""
        if not self.energies:
            if kind is not None:
                raise IngestError(f"--energy-kind does not apply to --format {self.name} (it reads the labels "
                                  "under --energy-key/--forces-key/--stress-key)")
            return None, None
        kind = kind or next(iter(self.energies))
        if kind not in self.energies:
            raise IngestError(f"--format {self.name} holds the energy kinds {', '.join(self.energies)}; "
                              f"got --energy-kind {kind}")
        return kind, self.energies[kind]


@dataclass
class ReadContext:
    """What a reader needs besides the path; ``notes`` collects what a reader skipped and why."""

    keys: LabelKeys = field(default_factory=LabelKeys)
    energy_kind: str | None = None
    trust_pickle: bool = False
    split: str | None = None
    notes: list[str] = field(default_factory=list)


_HA = "Hartree"
# ANI-1x / ANI-1ccx total energies by dataset key (the data descriptor's method table)
LEVELS_BY_KEY = {"wb97x_dz.energy": "wB97x/6-31G(d) (Gaussian, ANI-1x)",
                 "wb97x_tz.energy": "wB97x/def2-TZVPP (ORCA, ANI-1x)",
                 "ccsd(t)_cbs.energy": "CCSD(T)*/CBS (ORCA, ANI-1ccx)",
                 "hf_dz.energy": "HF/cc-pVDZ (ANI-1x)", "hf_tz.energy": "HF/cc-pVTZ (ANI-1x)",
                 "hf_qz.energy": "HF/cc-pVQZ (ANI-1x)"}
_T1X = "wB97x/6-31G(d)"
_FAIRCHEM = "lamm_ds.ingest.readers:iter_fairchem_preset"

FORMATS: dict[str, FormatSpec] = {spec.name: spec for spec in (
    FormatSpec("ase", "anything ase.io reads (extxyz, VASP, CIF, trajectories, ...)",
               "lamm_ds.ingest.xyz_chunks:iter_ase_source", label_keys=True),
    FormatSpec("ase-db", "ASE SQLite database (*.db)", "lamm_ds.ingest.readers:iter_ase_db_source",
               label_keys=True),
    FormatSpec("fairchem-lmdb", "fairchem/OCP LMDB of pickled PyG Data (*.lmdb or a folder of them)",
               _FAIRCHEM, label_keys=True, pickle=True),
    FormatSpec("oc20", "OC20 S2EF LMDB (fairchem)", _FAIRCHEM, pickle=True, energies={
        "adsorption": EnergyChoice("y", "eV", "adsorption energy: DFT total minus the clean slab and gas-phase "
                                   "adsorbate references", "RPBE (VASP, OC20)")}),
    FormatSpec("oc22", "OC22 S2EF-Total LMDB (fairchem)", _FAIRCHEM, pickle=True, energies={
        "total": EnergyChoice("y", "eV", "total DFT energy (S2EF-Total)", "PBE+U (VASP, OC22)")}),
    FormatSpec("odac23", "ODAC23 S2EF LMDB (fairchem)", _FAIRCHEM, pickle=True, energies={
        "adsorption": EnergyChoice("y", "eV", "adsorption energy: DFT total minus the empty MOF and the "
                                   "gas-phase adsorbate", "PBE-D3 (VASP, ODAC23)"),
        "total": EnergyChoice("raw_y", "eV", "total DFT energy", "PBE-D3 (VASP, ODAC23)")}),
    FormatSpec("transition1x", "Transition1x HDF5 (reaction paths)",
               "lamm_ds.ingest.hdf5_formats:iter_transition1x", energies={
                   "total": EnergyChoice("wB97x_6-31G(d).energy", "eV", "total DFT energy", _T1X),
                   "atomization": EnergyChoice("wB97x_6-31G(d).energy", "eV", "atomization energy: total minus "
                                               "the Transition1x isolated-atom energies", _T1X)}),
    FormatSpec("qm7x", "QM7-X HDF5 (1000.hdf5 ... 8000.hdf5)", "lamm_ds.ingest.hdf5_formats:iter_qm7x", energies={
        "total": EnergyChoice("ePBE0+MBD", "eV", "total PBE0+MBD energy", "PBE0+MBD (FHI-aims, QM7-X)"),
        "atomization": EnergyChoice("eAT", "eV", "PBE0+MBD atomization energy", "PBE0+MBD (FHI-aims, QM7-X)")}),
    FormatSpec("ani1x", "ANI-1x / ANI-1ccx HDF5", "lamm_ds.ingest.hdf5_formats:iter_ani1x", label_keys=True,
               energies={"total": EnergyChoice("wb97x_dz.energy", _HA, "total energy (--energy-key picks "
                                               "another method's)", "wB97x/6-31G(d) (Gaussian, ANI-1x)")}),
    FormatSpec("spice", "SPICE HDF5 (the downloader's SPICE.hdf5)", "lamm_ds.ingest.hdf5_formats:iter_spice",
               energies={
                   "total": EnergyChoice("dft_total_energy", _HA, "total DFT energy",
                                         "wB97M-D3(BJ)/def2-TZVPPD (Psi4, SPICE)"),
                   "formation": EnergyChoice("formation_energy", _HA, "formation energy: total minus SPICE's "
                                             "isolated-atom references", "wB97M-D3(BJ)/def2-TZVPPD (Psi4, SPICE)")}),
    FormatSpec("qmugs", "QMugs SDF (structures/CHEMBL*/conf_*.sdf)", "lamm_ds.ingest.sdf:iter_qmugs", energies={
        "total": EnergyChoice("DFT:TOTAL_ENERGY", _HA, "total DFT energy", "wB97X-D/def2-SVP (Psi4, QMugs)"),
        "formation": EnergyChoice("DFT:FORMATION_ENERGY", _HA, "DFT formation energy (total minus atomic)",
                                  "wB97X-D/def2-SVP (Psi4, QMugs)"),
        "gfn2": EnergyChoice("GFN2:TOTAL_ENERGY", _HA, "total GFN2-xTB energy", "GFN2-xTB (QMugs)")}),
    FormatSpec("pubchem3d", "PubChem3D conformer SDF (unlabelled)", "lamm_ds.ingest.sdf:iter_pubchem3d",
               unlabelled=True),
    FormatSpec("mptrj", "MPtrj JSON (CHGNet's MPtrj_2022.9_full.json)", "lamm_ds.ingest.mptrj:iter_mptrj", energies={
        "uncorrected": EnergyChoice("uncorrected_total_energy", "eV", "raw VASP total energy",
                                    "PBE/PBE+U (VASP, Materials Project)"),
        "corrected": EnergyChoice("corrected_total_energy", "eV", "total energy with the MP2020 compatibility "
                                  "corrections (CHGNet's energy_per_atom x natoms)",
                                  "PBE/PBE+U + MP2020 corrections (VASP, Materials Project)")}),
    FormatSpec("aselmdb", "ASE LMDB database (*.aselmdb: OMat24, OMol25, ...)",
               "lamm_ds.ingest.aselmdb:iter_aselmdb", label_keys=True),
    FormatSpec("omat24", "OMat24 *.aselmdb", "lamm_ds.ingest.aselmdb:iter_aselmdb", energies={
        "total": EnergyChoice("energy", "eV", "total DFT energy", "PBE/PBE+U (VASP, OMat24)")}),
)}


def _reader(spec: FormatSpec):
    module, func = spec.reader.split(":")
    return getattr(importlib.import_module(module), func)


def _sdf_head(path: Path, limit: int = 1 << 16) -> str:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        return fh.read(limit).split("$$$$", 1)[0]


def _json_head(path: Path, limit: int = 1 << 16) -> str:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        return fh.read(limit)


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def _suffixes(path: Path) -> list[str]:
    s = [x.lower() for x in path.suffixes]
    return s[:-1] if s and s[-1] == ".gz" else s


def sniff(path: Path) -> str:
    """The format of ``path`` from its extension and a cheap look inside (the first SDF record, the
    first 64 KiB of a JSON file, the top-level groups of an HDF5 file)."""
    path = Path(path)
    if path.is_dir() or path.suffix in (".lmdb", ".db"):
        return {"fairchem-lmdb": "fairchem-lmdb", "ase-db": "ase-db"}[source_kind(path)]
    ext = (_suffixes(path) or [""])[-1]
    if ext == ".aselmdb":
        return "aselmdb"
    if ext in (".h5", ".hdf5", ".hdf") or _is_hdf5(path):  # QM7-X's files decompress to bare names (1000)
        from lamm_ds.ingest.hdf5_formats import sniff_hdf5

        return sniff_hdf5(path)
    if ext in (".sdf", ".mol", ".sd"):
        head = _sdf_head(path)
        if "<DFT:TOTAL_ENERGY>" in head or "<CHEMBL_ID>" in head:
            return "qmugs"
        if "<PUBCHEM_" in head:
            return "pubchem3d"
    if ext == ".json":
        head = _json_head(path)
        if head.lstrip().startswith("{") and '"structure"' in head and "total_energy" in head:
            return "mptrj"
    return "ase"


def resolve(path: Path, fmt: str | None) -> FormatSpec:
    """The format of one input: ``fmt`` if given (``auto``/None: sniffed)."""
    if fmt in (None, "auto"):
        return FORMATS[sniff(Path(path))]
    if fmt not in FORMATS:
        raise IngestError(f"unknown --format {fmt!r}; one of auto, {', '.join(FORMATS)}")
    return FORMATS[fmt]


def check_options(spec: FormatSpec, keys: LabelKeys, energy_kind: str | None) -> None:
    """Refuse options that do not apply to ``spec`` instead of ignoring them."""
    spec.energy(energy_kind)
    named = [f"--{k}-key" for k, v in (("energy", keys.energy), ("forces", keys.forces), ("stress", keys.stress))
             if v is not None]
    if named and not spec.label_keys:
        raise IngestError(f"{', '.join(named)} does not apply to --format {spec.name}: its labels live under fixed "
                          f"keys{'; use --energy-kind ' + '|'.join(spec.energies) if spec.energies else ''}")
    if keys.stress_unit != "eV/A3" and not spec.label_keys:
        raise IngestError(f"--stress-unit does not apply to --format {spec.name}: it converts its own units")


def iter_format(path: Path, spec: FormatSpec, ctx: ReadContext) -> Iterator[Structure]:
    """Structures of one input in ``spec``'s format; ``--unlabelled`` strips labels here for all formats."""
    for s in _reader(spec)(Path(path), ctx, spec):
        if ctx.keys.unlabelled:
            s.energy = s.forces = s.stress = None
        yield s
