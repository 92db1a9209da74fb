"""The direct-call floor of a Flower app: its ServerApp and ClientApp with no engine between them.

``DirectGrid`` answers ``send_and_receive`` by calling the ClientApp on each message, in order,
with one persistent Context per node: no copies of the content, no isolation of random generators,
no message ids beyond what ``Message`` needs, nothing kept between rounds. Whatever an engine
adds per call (fedsim's local engine included) is measured against this loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.wire import flower_private as fp


class DirectGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any], run_id: int = 1) -> None:
        self.client_app, self.run_id, self.run_config = client_app, run_id, run_config
        self.node_ids = list(range(1, num_nodes + 1))
        self.contexts: dict[int, Context] = {}
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count()
        self._run = fp.make_run(run_id)

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def _context(self, node_id: int) -> Context:
        context = self.contexts.get(node_id)
        if context is None:
            node_config = {fp.PARTITION_ID_KEY: node_id - 1, fp.NUM_PARTITIONS_KEY: len(self.node_ids)}
            context = Context(run_id=self.run_id, node_id=node_id, node_config=node_config, state=RecordDict(),
                              run_config=self.run_config)
            self.contexts[node_id] = context
        return context

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            fp.set_message_id(message, str(next(self._ids)))  # `reply_to=` reads the message's id
            replies.append(self.client_app(message=message, context=self._context(message.metadata.dst_node_id)))
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for reply in self.send_and_receive(messages):
            ids.append(str(next(self._ids)))
            self._replies[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]


def run_direct(server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any]) -> Context:
    grid = DirectGrid(client_app, num_nodes, run_config)
    context = Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    with fp.task_identity(run_id=grid.run_id):
        server_app(grid=grid, context=context)
    return context
