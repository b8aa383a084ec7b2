"""`seqlm notify`: the notification block and the automations of automations.yaml on a Prefect
server, made or removed in one command, idempotently.

The block is Prefect's own: for a URL that Apprise knows (mailto://, slack://, discord://,
ntfy://, tgram://, ..., and the https webhooks of Slack, Discord and Teams) the Apprise webhook
block that takes any Apprise URL (Prefect's "Slack Webhook": it hands the URL to Apprise as it
is; Prefect registers no more general Apprise block), and for any other http(s):// URL a Custom
Webhook block that POSTs JSON {"subject": ..., "body": ...}. The URL is kept as a secret of the
block either way. The automations are tagged `seqlm`: applying the file again updates them in
place, and an automation dropped from the file is deleted.

Call with PREFECT_API_URL set to the server (Prefect reads its settings once, when imported).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

AUTOMATIONS_FILE = Path("automations.yaml")
BLOCK_NAME = "seqlm-notify"
TAG = "seqlm"
# The block types `seqlm notify` saves; a block of the other kind is removed when the URL's kind
# changes, so that one URL is in use at a time.
APPRISE_BLOCK, WEBHOOK_BLOCK = "slack-webhook", "custom-webhook"


class NotifyError(ValueError):
    """A bad URL or automations file; the message names it."""


def notification_block(url: str) -> Any:
    """The Prefect notification block that sends to `url`."""
    import apprise
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
    if apprise.Apprise.instantiate(url, suppress_exceptions=True) is not None:
        return SlackWebhook(url=url)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        # {{url}} is filled in from the block's secrets when it sends: the URL (which may hold
        # a token) is stored and shown as a secret.
        return CustomWebhookNotificationBlock(
            name=BLOCK_NAME, url="{{url}}", method="POST", secrets={"url": url},
            json_data={"subject": "{{subject}}", "body": "{{body}}"})
    raise NotifyError(f"--url {url!r}: neither an Apprise URL (mailto://, slack://, ntfy://, ...: "
                      "https://github.com/caronc/apprise/wiki) nor an http(s):// webhook")


def load_automations(block_id: Any, path: Path = AUTOMATIONS_FILE) -> list[Any]:
    """The automations of `path`, each send-notification action sending through the block
    `block_id`, tagged `seqlm`; NotifyError naming the file and key when one is not valid."""
    from prefect.events.actions import UnknownAction
    from prefect.events.schemas.automations import AutomationCore
    from pydantic import ValidationError
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotifyError(f"{path}: file not found (run in the repository root)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise NotifyError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    listed = data.get("automations") if isinstance(data, dict) else None
    if not isinstance(listed, list) or not all(isinstance(a, dict) for a in listed):
        raise NotifyError(f"{path}: expected `automations:` with a list of automations")
    automations = []
    for i, entry in enumerate(listed):
        where = f"{path}: automations.{i} ({entry.get('name', 'no name')})"
        # Prefect ignores keys it does not know: a misspelt key would silently do nothing.
        unknown = sorted(set(entry) - set(AutomationCore.model_fields))
        if unknown:
            raise NotifyError(f"{where}: unknown key {', '.join(unknown)}")
        actions = [{**action, "block_document_id": str(block_id)}
                   if isinstance(action, dict) and action.get("type") == "send-notification"
                   else action for action in entry.get("actions", [])]
        try:
            automation = AutomationCore.model_validate(
                {**entry, "actions": actions, "tags": sorted({*entry.get("tags", []), TAG})})
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"])
            raise NotifyError(f"{where}: {key}: {error['msg']}") from None
        if any(isinstance(action, UnknownAction) for action in automation.actions):
            raise NotifyError(f"{where}: an action of unknown type")
        _check_templates(automation, where)
        automations.append(automation)
    names = [automation.name for automation in automations]
    if len(set(names)) != len(names):
        raise NotifyError(f"{path}: an automation name is used twice")
    return automations


UNSAVED = "00000000-0000-0000-0000-000000000000"   # the block's id while the file is checked


def _check_templates(automation: Any, where: str) -> None:
    """The messages' templates as the server checks them when it stores an automation (a
    template it refuses would leave the file applied in part)."""
    from prefect.events.actions import SendNotification
    from prefect.server.utilities.user_templates import validate_user_template
    for j, action in enumerate(automation.actions):
        if not isinstance(action, SendNotification):
            continue
        for field in ("subject", "body"):
            try:
                validate_user_template(getattr(action, field))
            except Exception as exc:  # noqa: BLE001 - Jinja's syntax and sandbox errors
                raise NotifyError(f"{where}: actions.{j}.{field}: not a valid template: "
                                  f"{exc}") from None


@dataclass
class Plan:
    """What `seqlm notify --url` makes, checked before anything is saved."""
    block: Any
    automations: list[Any]
    path: Path

    @property
    def sends_to(self) -> str:
        """What the block sends to, the URL's credentials and path left out."""
        from prefect.blocks.notifications import CustomWebhookNotificationBlock
        if isinstance(self.block, CustomWebhookNotificationBlock):
            url = self.block.secrets.get_secret_value()["url"]
            return f"a Custom Webhook block (POST JSON to {_site(url)})"
        return f"an Apprise webhook block ({_site(self.block.url.get_secret_value())})"


def plan(url: str, path: Path = AUTOMATIONS_FILE) -> Plan:
    return Plan(notification_block(url), load_automations(UNSAVED, path), path)


def apply(planned: Plan) -> list[str]:
    """Save the block and create or update the automations (deleting the `seqlm` automations
    the file no longer has); returns the names of those deleted."""
    from prefect import get_client
    with get_client(sync_client=True) as client:
        _delete_blocks(client, keep=planned.block.get_block_type_slug())
    block_id = planned.block.save(BLOCK_NAME, overwrite=True)
    automations = load_automations(block_id, planned.path)
    with get_client(sync_client=True) as client:
        existing = {a.name: a for a in _ours(client)}
        for automation in automations:
            if automation.name in existing:
                client.update_automation(existing.pop(automation.name).id, automation)
            else:
                client.create_automation(automation)
        for stale in existing.values():
            client.delete_automation(stale.id)
    return sorted(existing)


def remove() -> list[str]:
    """Delete the `seqlm` automations and the block; returns what was deleted."""
    from prefect import get_client
    with get_client(sync_client=True) as client:
        gone = []
        for automation in _ours(client):
            client.delete_automation(automation.id)
            gone.append(f"automation {automation.name}")
        gone += [f"block {BLOCK_NAME} ({slug})" for slug in _delete_blocks(client, keep=None)]
    return gone


def _ours(client: Any) -> list[Any]:
    return [a for a in client.read_automations() if TAG in a.tags]


def _delete_blocks(client: Any, keep: str | None) -> list[str]:
    """Delete the blocks named BLOCK_NAME of the types seqlm saves, but `keep`'s."""
    from prefect.exceptions import ObjectNotFound
    deleted = []
    for slug in (APPRISE_BLOCK, WEBHOOK_BLOCK):
        if slug == keep:
            continue
        try:
            document = client.read_block_document_by_name(BLOCK_NAME, slug)
        except ObjectNotFound:
            continue
        client.delete_block_document(document.id)
        deleted.append(slug)
    return deleted


def _site(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.hostname or ''}{f':{parsed.port}' if parsed.port else ''}/…"
