"""One error type for the service: an HTTP status, a machine-readable code and a message.

Everything a request can get wrong ends as an `ApiError`; the ingress turns it into
`{"error": {"code": ..., "message": ..., "type": ...}}` (the OpenAI error shape) with its status.
"""

from __future__ import annotations

from damo.media.decode import MediaReason


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        if self.status in (401, 403):
            return "authentication_error" if self.status == 401 else "permission_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "type": self.kind}}

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (ApiError, (self.status, self.code, self.message, self.headers))


# What a video that cannot be decoded means for the caller.
MEDIA_STATUS = {
    MediaReason.NOT_FOUND: 404,
    MediaReason.ACCESS_DENIED: 403,
    MediaReason.TIMEOUT: 422,  # the video takes longer to decode than the service allows
    MediaReason.ABSURD_DIMENSIONS: 413,
    MediaReason.STORAGE: 502,
}


def media_error(reason: MediaReason | str, message: str) -> ApiError:
    reason = MediaReason(reason)
    status = MEDIA_STATUS.get(reason, 422)
    return ApiError(status, f"video_{reason.value}", f"the video cannot be used: {message}")
