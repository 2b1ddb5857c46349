"""Stored images read back for the people allowed to see them: their owner and staff (ADMIN, HERO). The REST
API's downloads go through here; an image that is not yours is "not found", so ids reveal nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.errors import NotFound
from core.authz import authorize
from core.images import image_path
from core.security import Actor, Role
from db.models import Generation, StoredImage

__all__ = ["MEDIA_TYPES", "ImageFile", "generation_images", "image_file", "media_type"]

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def media_type(content_type: str) -> str:
    """The HTTP media type of a stored image's format (`images.content_type`)."""
    return MEDIA_TYPES.get(content_type, "application/octet-stream")
STAFF = (Role.ADMIN, Role.HERO)


@dataclass(frozen=True)
class ImageFile:
    id: int
    generation_id: str
    user_id: int | None
    position: int
    path: Path
    media_type: str
    sha256: str
    width: int
    height: int
    size_bytes: int
    seed: int | None


def _file(row: StoredImage) -> ImageFile:
    return ImageFile(
        id=row.id,
        generation_id=row.generation_id,
        user_id=row.user_id,
        position=row.position,
        path=image_path(f"{row.sha256}.{row.content_type}"),
        media_type=media_type(row.content_type),
        sha256=row.sha256,
        width=row.width,
        height=row.height,
        size_bytes=row.size_bytes,
        seed=row.seed,
    )


def image_file(session: Session, actor: Actor, image_id: int) -> ImageFile:
    """The image `image_id` if `actor` owns it or is staff; NotFound otherwise (or when its file is gone)."""
    who = authorize(session, actor, *Role, action="read images", lock=False)
    row = session.get(StoredImage, image_id)
    if row is None or (who.role not in STAFF and not who.is_system and row.user_id != who.user_id):
        raise NotFound(f"there is no image {image_id}")
    found = _file(row)
    if not found.path.is_file():
        raise NotFound(f"image {image_id} is recorded but its file is missing from the image store")
    return found


def generation_images(session: Session, actor: Actor, generation_id: str) -> list[ImageFile]:
    """A generation's images in order, for its owner or staff (NotFound for anyone else)."""
    who = authorize(session, actor, *Role, action="read images", lock=False)
    generation = session.get(Generation, generation_id)
    if generation is None or (who.role not in STAFF and not who.is_system and generation.user_id != who.user_id):
        raise NotFound(f"there is no generation {generation_id}")
    rows = session.scalars(
        select(StoredImage).where(StoredImage.generation_id == generation_id).order_by(StoredImage.position)
    )
    return [_file(row) for row in rows]
