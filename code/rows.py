"""The rows of the evaluation outputs: for each kind of output, its header and its row format together.

Every row starts ``idx label`` and ends with ``time`` (the image's wall-clock time, H:MM:SS.ffffff);
a ``--sequential`` output adds ``samples``, the samples drawn for the image. ``format_*`` take what
the evaluation returned for one image (``eval_utils.Evaluation``).
"""
import datetime
import math

#: certify.py and certify_c.py (Cohen et al.'s CERTIFY): radius with 3 significant digits.
CERTIFY_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
#: ... with --sequential: the radius rounded down to 3 significant digits, so that it is always certified.
SEQUENTIAL_CERTIFY_HEADER = CERTIFY_HEADER + "\tsamples"
#: predict.py (Cohen et al.'s PREDICT).
PREDICT_HEADER = "idx\tlabel\tpredict\tcorrect\ttime"
SEQUENTIAL_PREDICT_HEADER = PREDICT_HEADER + "\tsamples"
#: smooth_prediction.py: the top two classes and their frequencies among N samples.
SMOOTH_PREDICTION_HEADER = "idx\tlabel\tp1\tp2\tc1\tc2\tcorrect\ttime"


def format_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=seconds))


def floor_3_digits(value: float) -> float:
    """``value`` rounded down to 3 significant digits (0 stays 0)."""
    if value <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(value)) - 2)
    # (the 1e-9 keeps a value that is already a 3-digit number from dropping a digit to float error)
    return math.floor(value / step + 1e-9) * step


def format_certify_row(idx: int, label: int, result, seconds: float) -> str:
    prediction, radius = result
    correct = int(prediction == label)
    return "{}\t{}\t{}\t{:.3}\t{}\t{}".format(idx, label, prediction, radius, correct, format_time(seconds))


def format_sequential_certify_row(idx: int, label: int, result, seconds: float) -> str:
    prediction, radius, samples = result
    correct = int(prediction == label)
    return "{}\t{}\t{}\t{:.3}\t{}\t{}\t{}".format(idx, label, prediction, floor_3_digits(radius), correct,
                                               format_time(seconds), samples)


def format_predict_row(idx: int, label: int, prediction, seconds: float) -> str:
    correct = int(prediction == label)
    return "{}\t{}\t{}\t{}\t{}".format(idx, label, prediction, correct, format_time(seconds))


def format_sequential_predict_row(idx: int, label: int, result, seconds: float) -> str:
    prediction, samples = result
    return format_predict_row(idx, label, prediction, seconds) + "\t{}".format(samples)


def format_smooth_prediction_row(idx: int, label: int, p1: int, p2: int, c1: float, c2: float,
                                 seconds: float) -> str:
    return "{}\t{}\t{}\t{}\t{:.5}\t{:.5}\t{}\t{}".format(idx, label, p1, p2, float(c1), float(c2), int(p1 == label),
                                                         format_time(seconds))
