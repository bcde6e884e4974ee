"""The web app's history routes (/api/conversations, /api/config): an APIRouter over the SQLite store.
Every route is guarded; another owner's conversation is reported exactly like a missing one (404)."""

# (no `from __future__ import annotations`: FastAPI reads the routes' body types, local to the router
# builder, from the live annotations)
from contextlib import contextmanager

from fastapi import APIRouter, Depends

from seekling.serve.responses import (
    OPENAI_ERRORS,
    Conversation,
    ConversationList,
    Deleted,
    WebConfig,
    answer,
)
from seekling.serve.schemas import Schemas
from seekling.serve.security import APIError
from seekling.serve.store import Store


def found(conv: dict | None) -> dict:
    if conv is None:
        raise APIError(404, "No such conversation.", "invalid_request_error", "id", "not_found")
    return conv


@contextmanager
def storable():
    """The store refuses data that is not JSON before writing anything: a 400, not a 500 and a broken row."""
    try:
        yield
    except ValueError as e:
        raise APIError(400, f"The conversation cannot be stored: {e}.", "invalid_request_error") from e


def history_router(store: Store, schemas: Schemas, guard, config: dict) -> APIRouter:
    """The routes; `config` is what /api/config tells the web app (the model id, the largest max_tokens)."""
    router = APIRouter(prefix="/api", tags=["history"], responses=OPENAI_ERRORS)
    ConversationIn, ConversationUpdate = schemas.conversation_in, schemas.conversation_update

    @router.get("/conversations", responses=answer(ConversationList))
    def list_conversations(owner: str = Depends(guard)):
        return {"data": store.list(owner)}

    @router.post("/conversations", status_code=201, responses=answer(Conversation, status=201))
    def create_conversation(body: ConversationIn, owner: str = Depends(guard)):
        data = body.model_dump(exclude_none=True)
        with storable():
            return store.create(owner, data.pop("title"), data)

    @router.get("/conversations/{conv_id}", responses=answer(Conversation))
    def get_conversation(conv_id: str, owner: str = Depends(guard)):
        return found(store.get(owner, conv_id))

    @router.put("/conversations/{conv_id}", responses=answer(Conversation))
    def update_conversation(conv_id: str, body: ConversationUpdate, owner: str = Depends(guard)):
        data = body.model_dump(exclude_none=True)
        with storable():
            return found(store.update(owner, conv_id, data.pop("title", None), data))

    @router.delete("/conversations/{conv_id}", responses=answer(Deleted))
    def delete_conversation(conv_id: str, owner: str = Depends(guard)):
        if not store.delete(owner, conv_id):
            found(None)
        return {"id": conv_id, "deleted": True}

    @router.get("/config", responses=answer(WebConfig))
    def web_config(owner: str = Depends(guard)):
        """What the web app needs: the model id and the server's caps (to bound its settings)."""
        return config

    return router
