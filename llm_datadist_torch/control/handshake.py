"""Both sides of the handshake that makes a link.

1. Client -> server `Hello`: claims (cluster id, pid, host id), a fresh challenge, and the
   session token the server must put in requests to the client.
2. Server -> client `HelloReply`: the token the client must use, the server's own challenge,
   its proof of sharing the client's host (identity.py) when it claims to, and, where a shared
   key is configured, its MAC over both challenges (auth.py).
3. Client -> server `Proof`, when the server asked one: the client's proof of sharing the
   host and/or its MAC. Until the server checked it, the link is served as remote, and, where a
   key is configured, not served at all.

Same process and same host come from these proofs, never from the claims; a peer that claims
to share this host and cannot prove it is refused.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING, Dict, Optional, Tuple

from ..core.engine import Engine
from ..status import LLMException, LLMStatusCode, fail
from ..transport.base import Peer
from . import auth, identity
from .link import Link, host_of
from .messages import Ack, Hello, HelloReply, Message, MooncakeEndpoint, Proof, Unlink
from .mooncake_peering import MooncakePeering
from .releases import ReleaseQueue
from .rpc_client import RpcClient

if TYPE_CHECKING:
    from .links import LinkManager

logger = logging.getLogger(__name__)

SESSION_BYTES = 16


@dataclasses.dataclass
class _Asked:
    """What the server asked of a client in its reply and checks in the client's `Proof`."""

    challenge: bytes  # the server's
    client_challenge: bytes
    proof: Optional[identity.ProofFile]  # the server's own proof file, kept open until then


class Handshake:
    def __init__(self, links: "LinkManager", engine: Engine, mooncake: MooncakePeering,
                 host_id: str):
        self._links = links
        self._engine = engine
        self._mooncake = mooncake
        self._host_id = host_id
        self._key = engine.options.auth_key
        self._asked: Dict[Link, _Asked] = {}
        self._lock = threading.Lock()

    def _identity(self) -> dict:
        return dict(cluster_id=self._engine.cluster_id, host_id=self._host_id, pid=os.getpid(),
                    mooncake_endpoint=self._mooncake.endpoint,
                    mooncake_required=self._mooncake.forced)

    def _new_link(self, cluster_id: int, peer: Peer, rpc: Optional[RpcClient], session: bytes,
                  **fields) -> Link:
        return Link(cluster_id, peer, rpc, self._engine.options.transfer_backend,
                    self._links.bounce, session=session,
                    releases=ReleaseQueue(self._links.release_sender.wake), **fields)

    # ---- client side -------------------------------------------------------------------------
    def link_to(self, address: str, peer_host: str, local_ip: Optional[str],
                deadline: float) -> Tuple[Link, bytes]:
        """Handshake with the server at `address`: the link and the token it is reached by.

        `LLMException` with the status to report when the server refuses, does not answer,
        claims to share this host without proving it, or does not authenticate."""
        if self._mooncake.forced:
            self._mooncake.start(peer_host, local_ip)  # so the server learns our endpoint now
        challenge = identity.new_challenge()
        token = secrets.token_bytes(SESSION_BYTES)
        hello = Hello(reply_endpoint=self._links.reply_endpoint, challenge=challenge,
                      session=token, **self._identity())
        rpc = RpcClient(address)
        try:
            try:
                reply = rpc.call(hello, max(deadline - time.monotonic(), 0.001))
            except LLMException as exc:
                fail(LLMStatusCode.LLM_LINK_FAILED, "no handshake with %s: %s", address, exc)
            if not isinstance(reply, HelloReply) or not reply.accepted:
                code = (reply.status_code if isinstance(reply, HelloReply)
                        else LLMStatusCode.LLM_LINK_FAILED)
                fail(LLMStatusCode(code), "%s refused the link: %s", address,
                     getattr(reply, "message", reply))
            try:
                link = self._complete(rpc, hello, reply, peer_host, local_ip, deadline)
            except LLMException:
                try:  # the server already holds a link with us: drop it (best effort)
                    rpc.call(Unlink(session=reply.session), 0.5)
                except LLMException:
                    pass
                raise
        except BaseException:
            rpc.close()
            raise
        finally:
            identity.forget(challenge)
        return link, token

    def _complete(self, rpc: RpcClient, hello: Hello, reply: HelloReply, peer_host: str,
                  local_ip: Optional[str], deadline: float) -> Link:
        """Check the server's answer (authentication, same process or host), give what it
        asked (`Proof`), start our Mooncake agent if the link needs one and the server does not
        know it yet (then tell it and learn its endpoint), and build the link."""
        if self._key is not None and not auth.valid(self._key, reply.auth, auth.SERVER,
                                                    hello.challenge, reply.challenge):
            fail(LLMStatusCode.LLM_LINK_FAILED, "cluster %d did not authenticate with the shared "
                 "key (LLM_DATADIST_TORCH_AUTH_KEY): is it set to the same value there?",
                 reply.cluster_id)
        if self._key is None and reply.auth:
            fail(LLMStatusCode.LLM_LINK_FAILED, "cluster %d requires authenticated links: set "
                 "LLM_DATADIST_TORCH_AUTH_KEY (or the llm_datadist_torch.AuthKey option) to its "
                 "shared key", reply.cluster_id)
        # (A process has one host id; tests that give clusters of one process different ones
        # make them play separate hosts.)
        same_process = (identity.answered_locally(hello.challenge) and reply.pid == os.getpid()
                        and reply.host_id == self._host_id)
        start = None
        proof = None
        if not same_process and reply.host_id == self._host_id:
            proven, why = identity.verify_proof(identity.SERVER_PROOF, hello.challenge, reply.pid,
                                                reply.proof_name, reply.proof_fd)
            if not proven:
                fail(LLMStatusCode.LLM_LINK_FAILED, "cluster %d says it shares this host (pid "
                     "%d) but did not prove it: %s", reply.cluster_id, reply.pid, why)
            start = identity.start_time(reply.pid)
            proof = identity.ProofFile(identity.CLIENT_PROOF, reply.challenge)
        try:
            if proof is not None or self._key is not None:
                mac = (auth.mac(self._key, auth.CLIENT, reply.challenge, hello.challenge)
                       if self._key is not None else b"")
                rpc.call(Proof(session=reply.session, mac=mac,
                               proof_name=proof.name if proof else "",
                               proof_fd=proof.fd if proof else -1),
                         max(deadline - time.monotonic(), 0.001))
        finally:
            if proof is not None:
                proof.close()
        their_endpoint = reply.mooncake_endpoint
        if self._mooncake.needed_with(reply, self._host_id) and not hello.mooncake_endpoint:
            agent = self._mooncake.start(peer_host, local_ip)
            answer = rpc.call(MooncakeEndpoint(session=reply.session, endpoint=agent.endpoint),
                              max(deadline - time.monotonic(), 0.001))
            their_endpoint = getattr(answer, "endpoint", "") or their_endpoint
        peer = Peer(pid=reply.pid, same_process=same_process,
                    same_host=same_process or start is not None,
                    mooncake_endpoint=their_endpoint, mooncake_agent=self._mooncake.agent)
        return self._new_link(reply.cluster_id, peer, rpc, reply.session, start_time=start)

    # ---- server side -------------------------------------------------------------------------
    def starts_mooncake(self, hello: Hello) -> bool:
        """Whether accepting `hello` would start our Mooncake agent (slow: not on the thread
        that serves requests)."""
        return (self._mooncake.agent is None and self._key is None
                and self._mooncake.needed_with(hello, self._host_id))

    def accept(self, hello: Hello) -> HelloReply:
        identity_fields = self._identity()

        def refuse(code: LLMStatusCode, message: str) -> HelloReply:
            logger.warning("cluster %d refused a link from cluster %d: %s",
                           self._engine.cluster_id, hello.cluster_id, message)
            return HelloReply(accepted=False, status_code=int(code), message=message,
                              **identity_fields)

        if hello.cluster_id == self._engine.cluster_id:
            return refuse(LLMStatusCode.LLM_PARAM_INVALID,
                          "a cluster cannot link with its own cluster_id")
        if not hello.session or not hello.challenge:
            return refuse(LLMStatusCode.LLM_LINK_FAILED, "a handshake without session and challenge")
        same_process = (identity.answer_if_local(hello.challenge) and hello.pid == os.getpid()
                        and hello.host_id == self._host_id)
        refused = self._links.room_for(hello.cluster_id)
        if refused is not None:
            return refuse(*refused)
        # Mooncake starts for an unauthenticated peer only where links are open (as upstream);
        # with a key, once the peer authenticated (its MooncakeEndpoint request).
        if not same_process and self._key is None \
                and self._mooncake.needed_with(hello, self._host_id):
            try:
                self._mooncake.start(host_of(hello.reply_endpoint))
            except LLMException as exc:
                return refuse(exc.status_code, str(exc))
            identity_fields = self._identity()  # now with our endpoint
        rpc = RpcClient(hello.reply_endpoint) if hello.reply_endpoint else None
        challenge = secrets.token_bytes(identity.CHALLENGE_BYTES)
        proof = None
        if not same_process and hello.host_id == self._host_id:
            # The client proves it shares this host in a `Proof`; until then it is remote.
            try:
                proof = identity.ProofFile(identity.SERVER_PROOF, hello.challenge)
            except BaseException:
                if rpc is not None:
                    rpc.close()
                raise
        token = secrets.token_bytes(SESSION_BYTES)
        peer = Peer(pid=hello.pid, same_process=same_process, same_host=same_process,
                    mooncake_endpoint=hello.mooncake_endpoint, mooncake_agent=self._mooncake.agent)
        link = self._new_link(hello.cluster_id, peer, rpc, hello.session,
                              authenticated=self._key is None)
        if proof is not None or self._key is not None:
            with self._lock:
                self._asked[link] = _Asked(challenge, hello.challenge, proof)
        self._links.add(link, token)
        logger.info("cluster %d accepted a link from cluster %d (pid %d)", self._engine.cluster_id,
                    hello.cluster_id, hello.pid)
        mac = (auth.mac(self._key, auth.SERVER, hello.challenge, challenge)
               if self._key is not None else b"")
        return HelloReply(accepted=True, status_code=int(LLMStatusCode.LLM_SUCCESS), session=token,
                          challenge=challenge, proof_name=proof.name if proof else "",
                          proof_fd=proof.fd if proof else -1, auth=mac, **identity_fields)

    def on_proof(self, link: Link, request: Proof) -> Message:
        """The client of `link` authenticates and/or proves it shares this host: from then on
        it is served (and, on this host, by the same-host transports, CMA included)."""
        with self._lock:
            asked = self._asked.pop(link, None)
        if asked is None:
            fail(LLMStatusCode.LLM_PARAM_INVALID, "no proof was asked of cluster %d",
                 link.cluster_id)
        try:
            if self._key is not None and not auth.valid(self._key, request.mac, auth.CLIENT,
                                                        asked.challenge, asked.client_challenge):
                fail(LLMStatusCode.LLM_LINK_FAILED, "cluster %d did not authenticate with the "
                     "shared key", link.cluster_id)
            if asked.proof is not None:
                proven, why = identity.verify_proof(identity.CLIENT_PROOF, asked.challenge,
                                                    link.peer.pid, request.proof_name,
                                                    request.proof_fd)
                if not proven:
                    fail(LLMStatusCode.LLM_LINK_FAILED, "cluster %d says it shares this host "
                         "(pid %d) but did not prove it: %s", link.cluster_id, link.peer.pid, why)
        finally:
            if asked.proof is not None:
                asked.proof.close()
        with link.lock:
            link.authenticated = True
            if asked.proof is not None:
                link.start_time = identity.start_time(link.peer.pid)
                link.peer = dataclasses.replace(link.peer, same_host=True)
                link.routes.clear()  # worked out with the peer as it was
        self._links.grant_access()
        return Ack()

    def on_mooncake_endpoint(self, link: Link, request: MooncakeEndpoint) -> Message:
        """The client runs a Mooncake agent for this link: use it, and start ours (the peer has
        passed the handshake) so the answer can tell the client where it is."""
        agent = self._mooncake.start(host_of(link.rpc.endpoint if link.rpc else ""))
        with link.lock:
            link.peer = dataclasses.replace(link.peer, mooncake_endpoint=request.endpoint,
                                            mooncake_agent=agent)
            stale = link.transports.pop("mooncake", None)
            link.routes.clear()  # worked out with the peer as it was
        if stale is not None:
            stale.close()
        return MooncakeEndpoint(session=b"", endpoint=agent.endpoint)

    def forget(self, link: Link) -> None:
        """`link` left the table: drop what was asked of it."""
        with self._lock:
            asked = self._asked.pop(link, None)
        if asked is not None and asked.proof is not None:
            asked.proof.close()
