"""The evaluation protocol of ../shared/PROTOCOL.md as constants, so every figure uses the same groups."""

TRAINING_GROUPS: tuple[str, ...] = (
    "Nigeria",
    "Egypt",
    "India (Current national sample)",
    "Germany",
    "United States",
    "Canada",
    "Argentina",
    "Australia",
)
HELD_OUT_GROUPS: tuple[str, ...] = ("China", "Japan", "France", "Spain", "Brazil", "New Zealand")

# questions per training episode, drawn uniformly, inclusive
CONTEXT_RANGE: tuple[int, int] = (9, 90)
TARGET_RANGE: tuple[int, int] = (9, 90)
EVAL_MAX_CONTEXT = 90
LEARNING_RATE = 3e-4
FEDERATED_ROUNDS = 100
LOCAL_STEPS = 6
CENTRALIZED_EPOCHS = 100
EVAL_EVERY = 10

# embeddings are unit vectors: a std of 1 per dimension would drown them many times over
MAX_EMBEDDING_NOISE = 1.0
# The update metric (UpdateHeader.metrics) with `LocalTrainer.alignment_before`: what a
# fairness-aware coordinator weighs updates by (coordinator `fairness_q`).
ALIGNMENT_BEFORE = "alignment_before"
# The nodes' local optimizer (Hyperparameters.optimizer) and whether a node keeps its state from
# one TRAIN task to the next, as the paper's nodes do (Hyperparameters.keep_local_optimizer_state).
LOCAL_OPTIMIZER = "adam"
LOCAL_OPTIMIZERS = ("adam", "sgd")  # what a node can run
KEEP_LOCAL_OPTIMIZER_STATE = True

# What a node takes from a coordinator (it refuses a task or a Join reply outside these), and so
# what a coordinator may set: one definition for both sides.
MAX_LOCAL_STEPS = 100_000
MAX_LEARNING_RATE = 1.0  # learning rates in (0, 1]
MIN_HEARTBEAT_S = 0.5  # a node never beats faster, whatever the Join reply says
# A WAIT answered sooner than this after the GetTask was sent is waited out to it: by the
# coordinator's retry_after for a short `wait`, and by a node whatever retry_after says.
MIN_POLL_INTERVAL_S = 1.0
# A session replaced by a newer Join of its node is refused with details containing this mark;
# a node whose session is replaced this many times within the window is one of two processes
# running with one certificate (a restarted node replaces its session once): the coordinator
# warns, and the node that sees it stops.
REPLACED_SESSION_MARK = "was replaced by a newer Join"
REPLACEMENTS_PER_WINDOW, REPLACEMENT_WINDOW_S = 3, 600.0
MAX_HEARTBEAT_S = 3600.0  # a node refuses a longer interval
# A group's name as the allow-list, the data files, a node's config and Join carry it: printable,
# no surrounding spaces, at most this long. A node refuses a longer one in its config rather than
# be refused at Join.
MAX_GROUP_NAME = 200
