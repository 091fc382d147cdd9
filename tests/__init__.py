"""The suite, one folder a layer: ``core/`` (ops in one process), ``ranks/`` (mixing across gloo ranks),
``composer/`` (the Composer algorithms in Trainers), ``doors/`` (the other front doors), ``cuda/`` (GPU and
NCCL), ``scripts/`` (launch/, the docs as code, the wheel); shared helpers in ``helpers/``; ``conftest.py``
holds the suite-wide settings."""
