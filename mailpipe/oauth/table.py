"""The ``oauth`` key of a POP3 or IMAP mailbox as a field type, without the models.

:data:`OAuthOptions` validates the table with the provider's model of
:mod:`mailpipe.oauth.options`, chosen by ``provider``, whenever the mailbox's options
are (start-up, ``mailpipe check``): a mistake is reported then, naming its key. That
module (nine pydantic classes) is imported, and the models built, with the first
``oauth`` table or the first JSON Schema, not with every mailbox's options
(issue 18). The type checker sees the union of the three provider models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler, ValidationInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

if TYPE_CHECKING:
    from mailpipe.oauth.options import AnyOAuth


def _validate(value: Any, info: ValidationInfo) -> AnyOAuth:
    from mailpipe.oauth.options import validate_table

    return validate_table(value, info)


class ProviderTable:
    """The pydantic schema of the ``oauth`` field (see the module docstring)."""

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(_validate)

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        from mailpipe.oauth.options import provider_union

        return handler(provider_union().core_schema)


if TYPE_CHECKING:
    OAuthOptions = AnyOAuth
else:
    #: The ``oauth`` table: one of the provider models, chosen by ``provider``.
    OAuthOptions = Annotated[Any, ProviderTable]
