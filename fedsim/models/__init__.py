"""Plain single-device models (``part_a``: the exam's networks; later issues add ``mae``, ``fewshot``)."""
