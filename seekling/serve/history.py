"""The web app's history routes (/api/conversations, /api/config): an APIRouter over the SQLite store.
Every route is guarded; another owner's conversation is reported exactly like a missing one (404)."""

# (no `from __future__ import annotations`: FastAPI reads the routes' body types, local to the router
# builder, from the live annotations)
from fastapi import APIRouter, Depends

from seekling.serve.schemas import ERROR_RESPONSES, Schemas
from seekling.serve.security import APIError, Settings
from seekling.serve.store import Store


def found(conv: dict | None) -> dict:
    if conv is None:
        raise APIError(404, "No such conversation.", "invalid_request_error", "id", "not_found")
    return conv


def history_router(store: Store, schemas: Schemas, guard, settings: Settings, model_name: str) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["history"], responses=ERROR_RESPONSES)
    ConversationIn, ConversationUpdate = schemas.conversation_in, schemas.conversation_update

    @router.get("/conversations")
    def list_conversations(owner: str = Depends(guard)):
        return {"data": store.list(owner)}

    @router.post("/conversations", status_code=201)
    def create_conversation(body: ConversationIn, owner: str = Depends(guard)):
        data = body.model_dump(exclude_none=True)
        return store.create(owner, data.pop("title"), data)

    @router.get("/conversations/{conv_id}")
    def get_conversation(conv_id: str, owner: str = Depends(guard)):
        return found(store.get(owner, conv_id))

    @router.put("/conversations/{conv_id}")
    def update_conversation(conv_id: str, body: ConversationUpdate, owner: str = Depends(guard)):
        data = body.model_dump(exclude_none=True)
        return found(store.update(owner, conv_id, data.pop("title", None), data))

    @router.delete("/conversations/{conv_id}")
    def delete_conversation(conv_id: str, owner: str = Depends(guard)):
        if not store.delete(owner, conv_id):
            found(None)
        return {"id": conv_id, "deleted": True}

    @router.get("/config")
    def web_config(owner: str = Depends(guard)):
        """What the web app needs: the model id and the server's caps (to bound its settings)."""
        return {"model": model_name, "max_tokens_cap": settings.max_tokens_cap}

    return router
