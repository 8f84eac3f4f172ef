"""facemend's distributed mode: a Celery worker pool on Redis.

- ``settings``  ``Settings.from_env()``: every ``FACEMEND_*`` variable in one place
- ``app``       the Celery app (``celery -A worker.app worker``) and the worker-child start-up
- ``tasks``     plan -> segment x N -> join for videos; plan -> chunk x N -> summarise for folders
- ``segments``  where a video is cut and where each part file lives
- ``records``   job records in Redis (state, progress, parts), kept beyond Celery's results
- ``watchdog``  sends again the parts whose worker or message was lost; fails stalled jobs
- ``jobs``      the client side: submit, follow, cancel (used by ``cli.py``)
- ``engines``   the loaded models of one worker child
- ``storage``   allowed storage roots
- ``errors``    the errors this package adds to facemend's tree

Importing ``worker`` imports nothing heavy; ``worker.app`` imports Celery, ``worker.tasks`` torch.
"""
