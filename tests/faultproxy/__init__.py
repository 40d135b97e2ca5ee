"""A fault-injecting HTTP proxy between an S3 client and the local SeaweedFS server.

Reliability tests point boto3 (or the daemon) at ``FaultProxy.endpoint_url``. The proxy
forwards each request to the upstream server on 127.0.0.1 and, when a test requests it,
closes connections, delays requests past the client's read timeout, sends S3 error
responses or shifts the ``Date`` header of responses. It parses HTTP/1.1 just enough to
find where each request and response ends, so keep-alive connections that carry several
requests work, and it records every request it reads.

The proxy runs in threads of the test process: one thread accepts connections and one
thread serves each client connection together with its own upstream connection. The
proxy sends ``100 Continue`` itself for ``Expect: 100-continue`` requests and drops that
header upstream, so clients never wait for the interim response.
"""

from .faults import Matcher
from .proxy import FaultProxy
from .traffic import RequestRecord

__all__ = ["FaultProxy", "Matcher", "RequestRecord"]
