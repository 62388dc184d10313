"""The paths of the routes that take uploads, named once: the routes, the error handlers (which
count ``/segment``'s errors) and the middlewares (which guard uploads) all refer to them."""

SEGMENT_PATH = "/segment"
JOBS_PATH = "/jobs"
PREVIEW_PATH = "/preview"
