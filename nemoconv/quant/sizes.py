"""Bounds on the calibration data a quantize or an analysis may ask for (limits.py holds the numbers)."""

from __future__ import annotations

from nemoconv.errors import NemoconvError
from nemoconv.limits import MAX_CALIB_SAMPLES, MAX_CALIB_TOKENS, MAX_SEQ_LEN


def check_calibration_sizes(calib_samples, calib_seq_len) -> None:
    for value, flag, most in ((calib_samples, "--calib-samples", MAX_CALIB_SAMPLES),
                              (calib_seq_len, "--calib-seq-len", MAX_SEQ_LEN)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise NemoconvError(f"{flag} must be an integer in [1, {most}], got {value!r}")
    if calib_samples * calib_seq_len > MAX_CALIB_TOKENS:
        raise NemoconvError(f"--calib-samples × --calib-seq-len = {calib_samples * calib_seq_len} tokens; at most "
                            f"{MAX_CALIB_TOKENS} are calibrated on")
