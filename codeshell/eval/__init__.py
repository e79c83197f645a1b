"""codeshell.eval: HumanEval, MBPP and MultiPL-E evaluation with sandboxed execution.

Modules: ``tasks`` (problems, prompts, test programs), ``languages`` (toolchains, outcomes),
``sandbox`` (isolated execution), ``execution`` (parallel runs), ``metrics`` (pass@k),
``generation`` (backends, resumable sampling), ``runner`` (scoring, runs), ``report`` and
``cli`` (``codeshell eval``). Importing this package loads none of them, nor torch.
"""
