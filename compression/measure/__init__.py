"""What a job measures and how: the source model's numbers cached per (model, data, device,
settings) (:mod:`.baseline`), speed as interleaved dense/compressed rounds (:mod:`.speed`),
perplexity on more than one text (:mod:`.quality`), the user's tasks (:mod:`.tasks`) and the
behaviour diff on the user's prompts (:mod:`.prompts`)."""

MODES = ("full", "quality", "none")
