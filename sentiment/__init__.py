"""The contract between training and serving: text → ids, the model, the artifacts, the dataset reader.

``training/`` and ``app/`` both import this package and never each other. It keeps its imports
light (torch and spaCy only), so the service image carries it without any training dependency.
"""

# P(positive) at or above this is labelled "positive"; shared by the API and the evaluation.
LABEL_THRESHOLD = 0.5


def label_of(probability: float) -> str:
    """The label the API reports for a probability of positive sentiment."""
    return "positive" if probability >= LABEL_THRESHOLD else "negative"
