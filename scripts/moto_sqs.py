"""moto's SQS server, with its message deletion and receipt made thread-safe.

moto's server answers requests on threads, but two of its queue operations touch the
message list without holding `_messages_lock`:

- `Queue.delete_message` rebuilds the list from a snapshot and assigns it back. Two
  overlapping deletes can resurrect a deleted message, and a message appended in between is
  dropped after SendMessage answered success: a queue that loses an accepted message.
- `SQSBackend.receive_message` checks that a message is visible, then marks it received.
  Two overlapping receives both get it: one message delivered twice with receive count 1.

No real SQS does either. payretry's tests start moto through this file so that they test
payretry, not those races.

    python scripts/moto_sqs.py -H 127.0.0.1 -p PORT
"""

import os
import sys
import threading
import time

from moto.server import main
from moto.sqs import models

_delete_message = models.Queue.delete_message


def _delete_message_locked(self, receipt_handle):
    with self._messages_lock:
        return _delete_message(self, receipt_handle)


models.Queue.delete_message = _delete_message_locked

_receive_message = models.SQSBackend.receive_message


def _receive_message_locked(self, queue_name, *args, **kwargs):
    # The scan checks that a message is visible, then marks it received: two receives
    # overlapping between the check and the mark both get the same message. The lock is a
    # Condition over an RLock, so the long poll inside still releases it while it waits.
    with self.get_queue(queue_name)._messages_lock:
        return _receive_message(self, queue_name, *args, **kwargs)


models.SQSBackend.receive_message = _receive_message_locked



def _exit_with_parent():
    # A test binary starts one of these and keeps it in a static, which is never dropped:
    # when the binary's process ends, this server is orphaned. It then ends too.
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


if __name__ == "__main__":
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    sys.argv[0] = "moto_server"
    sys.exit(main())
