"""Separation quality against ground truth: BSSEval v4 (SDR, ISR, SIR, SAR) exactly as museval 0.4.1 computes
it (`bsseval`), and the MDX challenge's simple SDR (`nsdr`). Tensors in, numbers out; no I/O, no Prefect.
"""
