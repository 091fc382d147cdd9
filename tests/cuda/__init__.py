"""CUDA and NCCL: the ops, the mixers, a Composer Trainer and the benchmarks on a GPU equal the CPU and make only the
documented host syncs. Skipped without a GPU; ``launch/tools/gpu_check.py`` runs every ``test_*.py`` here."""
