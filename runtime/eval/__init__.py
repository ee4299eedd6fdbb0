"""Evaluation harnesses: `facert eval verify|mcq|attributes` (see runtime/cli/eval.py).

protocols what the seeds' protocols fix: the questions, the generation limits
pairs     verification pair sets in their native files (insightface .bin with a restricted
          unpickler, LFW, RFW, CALFW/CPLFW, CFP), format detection, folds
datasets  FaceXBench JSON and CelebA attribute lists (with the eval partition)
metrics   decision accuracy, 10-fold threshold-tuned accuracy, ROC / EER / TMR at fixed FMR,
          across-group mean/std, grouped accuracy
scoring   first-token P(yes), yes/no parsing, FaceXBench's and facert's option extraction, the
          ONNX face-embedding baseline
runner    backends (in-process pipeline, server), the resumable JSONL log, the concurrent loop
tasks     the three evaluations end to end
"""
