"""The benchmark (SPEC.md "Performance"); run it with ``python3 benchmarks/bench.py``.

cases.py: the batches, their allowed-pair counts and inputs. peers.py: one class per method
(ours, FA4, cuDNN, Flex, FA2). timing.py: do_bench medians, the backward through autograd.
studies.py: what one run measures. report.py: tables, ratios, JSON and markdown.
"""
