"""gptrain's own architecture as transformers remote code.

`gptrain export` copies configuration_gptrain.py and modeling_gptrain.py into the exported folder when no
standard transformers class computes the model (value embeddings, gpt2 with QK-norm, …); transformers then
loads the folder with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. Both files are
self-contained: they import torch and transformers, never gptrain, since whoever loads the folder may not
have gptrain installed. Importing this package imports nothing (transformers is an optional extra).
"""

CODE_FILES = ("configuration_gptrain.py", "modeling_gptrain.py")
