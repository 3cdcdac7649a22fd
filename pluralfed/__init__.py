"""pluralfed: federated training of a group preference predictor (GPO).

The core package holds what both the coordinator and the group nodes share: the model, survey data,
text embeddings, metrics, the tensor wire format and TLS helpers.
"""

__version__ = "0.1.0"
