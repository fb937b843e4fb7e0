"""What the engine raises when it cannot clip a per-example gradient exactly."""


class UnsupportedParameterError(RuntimeError):
    """A trainable parameter whose per-example gradient cannot be clipped exactly."""


class ExampleMixingError(UnsupportedParameterError):
    """A layer whose stored rows are not one example each: the model couples examples or the batch axis is not
    the examples' axis."""


class NonFiniteGradientError(ValueError):
    """A per-example loss or gradient norm that is NaN or infinite: its clip factor would make the whole clipped
    sum non-finite, and the released model would reveal that the example was there."""

    def __init__(self, quantity, examples):
        self.quantity, self.examples = quantity, examples
        super().__init__(f"non-finite per-example {quantity} for example(s) {examples[:5]} of the batch")
