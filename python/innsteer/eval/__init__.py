"""The evaluation layer: behaviour and fluency metrics, alpha sweeps and trade-offs, reports."""
