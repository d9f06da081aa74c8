"""Evaluation of PRMs: batched step scoring (`scoring`), ProcessBench first-error F1
(`processbench`), Best-of-N (`best_of_n`), pure metrics (`metrics`) and plots (`plots`)."""
