"""The ablation's INNSteer and CAA variants (bench/validation.py, bench/transport.py; docs/RESULTS.md,
"Ablation around the default"): each a MethodSpec with its options spelled out in full."""

from innsteer.eval.protocol import MethodSpec

# The variants of the ablation. Options are TrainConfig / FlowConfig fields, spelled out in full
# so a variant means the same whatever the defaults: the training rows (pooled means or every
# token), the NLL (one Gaussian for all rows, or one per class) and the kept epoch (validation
# loss or transport) first; then each loss term, the capacity and the learning rate swept around
# the default of the round that ran them (class-conditional NLL, selection by transport, no transport
# term: "inn-token-class-transport"); "default-transport1" is TrainConfig's default since finding 7.
JOINT_LOSS = {"nll": "joint", "select": "loss", "sep_weight": 0.0, "transport_weight": 0.0}
DEFAULT = {"nll": "class", "select": "transport", "sep_weight": 0.0, "transport_weight": 0.0}
VARIANTS = {
    "caa-token": MethodSpec("caa", "all"),
    "caa-pooled": MethodSpec("caa", "mean"),
    "inn-pooled": MethodSpec("innsteer", "mean", JOINT_LOSS),
    "inn-token": MethodSpec("innsteer", "all", JOINT_LOSS),
    "inn-token-transport": MethodSpec("innsteer", "all", {**JOINT_LOSS, "select": "transport"}),
    "inn-token-class": MethodSpec("innsteer", "all", {**JOINT_LOSS, "nll": "class"}),
    "inn-token-class-transport": MethodSpec("innsteer", "all", DEFAULT),
    "default-sep0.05": MethodSpec("innsteer", "all", {**DEFAULT, "sep_weight": 0.05}),
    "default-sep0.5": MethodSpec("innsteer", "all", {**DEFAULT, "sep_weight": 0.5}),
    "default-nonll": MethodSpec("innsteer", "all", {**DEFAULT, "nll_weight": 0.0, "sep_weight": 0.05}),
    "default-logdet0": MethodSpec("innsteer", "all", {**DEFAULT, "logdet_weight": 0.0}),
    "default-logdet10": MethodSpec("innsteer", "all", {**DEFAULT, "logdet_weight": 10.0}),
    "default-k2": MethodSpec("innsteer", "all", {**DEFAULT, "num_couplings": 2}),
    "default-k8": MethodSpec("innsteer", "all", {**DEFAULT, "num_couplings": 8}),
    "default-h64": MethodSpec("innsteer", "all", {**DEFAULT, "mlp_hidden": 64}),
    "default-h512": MethodSpec("innsteer", "all", {**DEFAULT, "mlp_hidden": 512}),
    "default-clamp0.5": MethodSpec("innsteer", "all", {**DEFAULT, "clamp": 0.5}),
    "default-lr3e-4": MethodSpec("innsteer", "all", {**DEFAULT, "lr": 3e-4}),
    "default-epochs5": MethodSpec("innsteer", "all", {**DEFAULT, "max_epochs": 5}),
    "default-pairs50": MethodSpec("innsteer", "all", {**DEFAULT}, train_fraction=0.5),  # half the training items
    # the transport term (TrainConfig.transport_weight): the selection criterion as a training loss
    "default-transport1": MethodSpec("innsteer", "all", {**DEFAULT, "transport_weight": 1.0}),
    "default-transport10": MethodSpec("innsteer", "all", {**DEFAULT, "transport_weight": 10.0}),
    # the selection (and the term) scoring the steer at alpha = -1 as well (TrainConfig.transport_sides)
    "default-both": MethodSpec("innsteer", "all", {**DEFAULT, "transport_sides": "both"}),
    "default-transport1-both": MethodSpec(
        "innsteer", "all", {**DEFAULT, "transport_weight": 1.0, "transport_sides": "both"}
    ),
    # capacity with the transport term (the default since finding 7)
    "default-transport1-k8": MethodSpec("innsteer", "all", {**DEFAULT, "transport_weight": 1.0, "num_couplings": 8}),
    "default-transport1-h512": MethodSpec("innsteer", "all", {**DEFAULT, "transport_weight": 1.0, "mlp_hidden": 512}),
    "default-transport-only": MethodSpec(
        "innsteer", "all", {**DEFAULT, "transport_weight": 1.0, "nll_weight": 0.0, "logdet_weight": 1.0}
    ),
}
