"""Built-in cost coefficients (seconds), measured with ``lamm-ds calibrate``; see docs/load_balancing.md.

Only the *ratios* between the per-sample coefficients matter for the plans (a common scale factor
changes nothing, and the per-micro-batch constant is paid by every rank alike); absolute values
only set the predicted seconds reported to TensorBoard. Calibrate on the target hardware and model
size for anything serious: ``lamm-ds calibrate --config <yours> --run-dir <run dir>``.

There is no built-in model for EquiformerV2: its cost depends strongly on lmax/mmax, channels and
the hardware, and no measurement of a representative configuration exists here. With
``model_kind: equiformer_v2`` the balanced/budget strategies require a calibration.
"""

from __future__ import annotations

from lamm_ds.scheduler.cost import CostModel

BUILTIN: dict[str, dict] = {
    # `lamm-ds calibrate --out ... --batches 60 --repeats 7 --max-graphs 16` with configs/demo.yaml
    # (LaMM-S demo PaiNN: hidden 64, 3 layers, 16 RBF, cutoff 5 Å, 24 neighbours, direct forces), fp32,
    # one CPU thread of a shared 2-vCPU AMD EPYC, torch 2.13.0+cpu, on 2026-11-25. Edges are the demo
    # datasets' stored counts (cutoff 6 Å, max_neighbors 50).
    # Fit: R² 0.913, worst relative error 26%, mean 8.8% over 60 micro-batches of 1-16 graphs / 3-400 atoms.
    "painn-demo-cpu": {
        "coefficients": {"atoms": 4.012e-05, "edges": 2.466e-06, "graphs": 0.0, "const": 3.572e-03},
        "meta": {"model_kind": "painn",
                 "model": {"hidden": 64, "layers": 3, "num_rbf": 16, "cutoff": 5.0, "max_neighbors": 24,
                           "forces": "direct"},
                 "hardware": {"device": "cpu", "torch_threads": 1, "processor": "AMD EPYC (2 vCPU, shared)"},
                 "edge_basis": [{"dataset": "*", "cutoff": 6.0, "max_neighbors": 50}],
                 "fit": {"r2": 0.913, "max_rel_error": 0.262, "mean_rel_error": 0.088, "n": 60}},
    },
}

DEFAULT_FOR_MODEL = {"painn": "painn-demo-cpu"}


def builtin_cost_model(name: str = "painn-demo-cpu") -> CostModel:
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in cost model {name!r}; known: {sorted(BUILTIN)} "
                         "(EquiformerV2 and other models must be calibrated: `lamm-ds calibrate`)")
    return CostModel.from_dict(BUILTIN[name], source=f"builtin:{name}")
