"""Helpers shared by the tests, no tests: rank spawning (``spawn``, ``plain_rank``), independent references
(``mix_reference``, ``seen_draws``, ``soft_targets``), Composer models, Trainers and datasets (``trainer_utils``,
``compat_models``, ``data_safety``), CUDA batches and the sync counter (``cuda``), running a launch/ script
(``scripts``), and the doors' rank bodies and launched loops (``torchvision_ranks``, ``lightning_run``,
``accelerate_loop``)."""
