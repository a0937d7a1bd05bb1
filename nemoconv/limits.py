"""Bounds of the numeric options, checked before any work (exit 2): far above any real use, far below
what would exhaust memory. The CLI (as click ranges) and the Python API check the same limits."""

MAX_PROMPTS = 4096            # verify --num-prompts
MAX_SEQ_LEN = 131072          # verify --seq-len, quantize --calib-seq-len
MAX_NEW_TOKENS = 4096         # verify --max-new-tokens
MAX_CALIB_SAMPLES = 65536     # quantize --calib-samples
MAX_CALIB_TOKENS = 1 << 24    # quantize: samples × seq_len (the token ids and hidden states grow with it)
