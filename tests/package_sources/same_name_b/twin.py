NAME = "b"


class Twin:
    def __call__(self):
        return NAME
