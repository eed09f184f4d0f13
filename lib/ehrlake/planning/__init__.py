"""Resource planning from the lake: weekly demand forecast per unit (:mod:`.forecast`) and a limited
resource allocated across units by a linear program (:mod:`.allocate`). Settings: ``conf/planning.yaml``
(:mod:`.settings`); the method and its measured limits: ``docs/planning.md``."""
