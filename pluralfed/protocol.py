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
