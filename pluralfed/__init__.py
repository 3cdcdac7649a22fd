"""pluralfed: federated training of a group preference predictor (GPO).

The core package holds what both the coordinator and the group nodes share: the model, survey data,
text embeddings, metrics, the tensor wire format, TLS helpers and the servers' mTLS guard (`auth`). Its applications sit beside the
core: the `pluralfed` command (`cli`, `commands`), which starts the coordinator and the nodes, a
federation on one machine (`localfed`) and the reward service (`reward`, `reward_server`).
"""

__version__ = "0.1.0"
