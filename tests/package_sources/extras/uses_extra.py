import deployd_extra_helper


class UsesExtra:
    def __call__(self, x):
        return deployd_extra_helper.triple(x)
