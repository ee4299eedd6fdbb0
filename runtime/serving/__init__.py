"""Serving: the Triton model repository, the server that runs it, and the step code inside it.

- `repo`: fills a model repository from the templates in model_repository/ and validates every
  config.pbtxt against Triton's ModelConfig protobuf.
- `server`: provisions and runs the Triton Inference Server that ships in the nvidia-pytriton wheel.
- `steps`: what each step of the ensemble computes, on numpy arrays (testable without Triton).
- `python_backend`: the glue between Triton's python backend and `steps` (imported inside Triton only).
"""
