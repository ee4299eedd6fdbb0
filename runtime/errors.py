"""The one exception facert raises for a request it cannot serve as sent."""


class RequestError(ValueError):
    """Bad input or an unmet bound. Its message is written for the client, and a server passes it on
    as it is; any other exception inside a server is a fault of the server, logged there with its
    traceback and answered with a message that carries no internals."""
