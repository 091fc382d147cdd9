"""The Composer algorithms (CutMix, MixUp, MixUpCutMix) in real Composer Trainers, on one process and on gloo
ranks: the drop-in table, resumption, microbatches, batch changes by other algorithms, train metrics, data safety."""
