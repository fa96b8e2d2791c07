"""Peer methods (GPTQ, AutoRound) run on the same model, calibration rows and evaluation as CBQ.

The quality benchmark (``benchmarks/quality.py --peers gptq,autoround``) puts them next to CBQ. The
packages are optional (``pip install -e ".[peers]"``); without them a peer's row says why it did not run.

* :mod:`~cbq_lightning.peers.settings` - the scheme's grid in the peers' terms, results, reasons
* :mod:`~cbq_lightning.peers.gptq` - GPTQ through GPTQModel
* :mod:`~cbq_lightning.peers.autoround` - AutoRound (SignRound) through auto-round
* :mod:`~cbq_lightning.peers.job` - one peer run on a recipe (``python -m cbq_lightning.peers``)
"""
