"""moto's SQS server, with its message deletion made thread-safe.

moto's `Queue.delete_message` rebuilds the queue's message list from a snapshot and assigns
it back without holding `_messages_lock`, while the server answers requests on threads. Two
overlapping deletes can resurrect a deleted message, and a message appended in between is
dropped after SendMessage answered success: a queue that loses an accepted message, which
no real SQS does. payretry's tests start moto through this file so that they test payretry,
not that race.

    python scripts/moto_sqs.py -H 127.0.0.1 -p PORT
"""

import sys

from moto.server import main
from moto.sqs import models

_delete_message = models.Queue.delete_message


def _delete_message_locked(self, receipt_handle):
    with self._messages_lock:
        return _delete_message(self, receipt_handle)


models.Queue.delete_message = _delete_message_locked

if __name__ == "__main__":
    sys.argv[0] = "moto_server"
    sys.exit(main())
