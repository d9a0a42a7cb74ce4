"""Reproducible experiments: SYNTHETIC lesions (:mod:`.lesions`) and GAIN on them (:mod:`.gain_experiment`)."""
