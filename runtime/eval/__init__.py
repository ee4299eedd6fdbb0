"""Evaluation harnesses: `facert eval verify|mcq|attributes` (see runtime/eval_cli.py).

datasets  the benchmark file formats (insightface .bin with a restricted unpickler, LFW pairs.txt,
          FaceXBench JSON, CelebA attribute lists) and the multi-image composite
metrics   10-fold verification accuracy, ROC / EER / TMR at fixed FMR, grouped accuracy
scoring   first-token P(yes), yes/no and option-letter parsing, the ONNX face-embedding baseline
runner    backends (in-process pipeline, server), the resumable JSONL log, the concurrent loop
tasks     the three evaluations end to end
"""
