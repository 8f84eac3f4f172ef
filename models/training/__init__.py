"""facemend's research tooling: crop data, degradations, training, evaluation, model cards.

Nothing here is loaded by the product at run time: ``pipeline``, ``worker`` and ``cli.py`` use
``models`` (tasks, the networks, their weights and inference engines) only. Every module here
is a command, ``python -m models.training.<name>``, or a part of one:

- ``data``: the aligned UTKFace crop cache and packs of it;
- ``degrade`` (with ``masks``): the seeded degradations that make training pairs and
  evaluation inputs;
- ``train`` (restoration networks, with ``batches`` and ``restoration``), ``train_vae``
  (FaceMath's VAE), ``age`` (the age judge): all on the one training loop in ``loop``;
- ``evaluate``, ``card``, ``speed``, ``parity``, ``facemath``: measurements and model cards.

``models.training`` may import ``pipeline`` (crops are aligned by the product's own code) and
``models``; never the other way round.
"""
