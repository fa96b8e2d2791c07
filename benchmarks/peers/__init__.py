"""Peer methods (GPTQ, AutoRound) run on the same model, calibration rows and evaluation as CBQ.

The quality benchmark (``benchmarks/quality.py --peers gptq,autoround``) puts them next to CBQ. The
packages are optional (``pip install -e ".[peers]"``); without them a peer's row says why it did not run.

* :mod:`~benchmarks.peers.settings` - the scheme's grid in the peers' terms, results, reasons
* :mod:`~benchmarks.peers.gptq` - GPTQ through GPTQModel
* :mod:`~benchmarks.peers.autoround` - AutoRound (SignRound) through auto-round
* :mod:`~benchmarks.peers.job` - one peer run on a recipe (``python -m benchmarks.peers``)
"""
