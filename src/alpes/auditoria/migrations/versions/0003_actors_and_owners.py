"""the actor of each audit record, and what each record belongs to (advertisers read their own)

Revision ID: 0003_actors_and_owners
Revises: 0002_api_keys
Create Date: 2026-12-05 03:00:00

Records audited before this revision have no actor (the events had none): their hash never covered
one and the chain verifies as it did. Their owners are filled in here from their payloads, so an
advertiser also finds the records of its campaigns audited before (the rule is written out below,
frozen as it was at this revision: campana_id / campaign_id, or `id` of a campaign's own events;
conversion_id; anunciante_id, or `id` of an advertiser's events), and the campaigns' owners from the
CampanaCreada records that carry one.
"""
import json

import sqlalchemy as sa
from alembic import op

revision = '0003_actors_and_owners'
down_revision = '0002_api_keys'
branch_labels = None
depends_on = None

_CAMPAIGN_EVENTS = {"CampanaCreada", "CampanaActivada", "CampanaPausada", "CampanaFinalizada"}
_ADVERTISER_EVENTS = {"AnuncianteRegistrado", "AnuncianteActualizado"}
_BATCH = 1000


def _an_id(value):
    return value if isinstance(value, str) and 0 < len(value) <= 80 else None


def _owners(event_type: str, payload) -> tuple:
    if not isinstance(payload, dict):
        return None, None, None
    campana = _an_id(payload.get("campana_id")) or _an_id(payload.get("campaign_id"))
    if campana is None and event_type in _CAMPAIGN_EVENTS:
        campana = _an_id(payload.get("id"))
    anunciante = _an_id(payload.get("anunciante_id"))
    if anunciante is None and event_type in _ADVERTISER_EVENTS:
        anunciante = _an_id(payload.get("id"))
    return campana, _an_id(payload.get("conversion_id")), anunciante


def upgrade() -> None:
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('actor_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('actor_role', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('campana_id', sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column('conversion_id', sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column('anunciante_id', sa.String(length=80), nullable=True))
        batch_op.create_index(batch_op.f('ix_audit_log_actor_id'), ['actor_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_campana_id'), ['campana_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_conversion_id'), ['conversion_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_anunciante_id'), ['anunciante_id'], unique=False)
    op.create_table('campanas_auditadas',
    sa.Column('campana_id', sa.String(length=80), nullable=False),
    sa.Column('anunciante_id', sa.String(length=80), nullable=True),
    sa.PrimaryKeyConstraint('campana_id')
    )
    with op.batch_alter_table('campanas_auditadas', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_campanas_auditadas_anunciante_id'), ['anunciante_id'], unique=False)
    op.create_table('conversiones_auditadas',
    sa.Column('conversion_id', sa.String(length=80), nullable=False),
    sa.Column('campana_id', sa.String(length=80), nullable=False),
    sa.PrimaryKeyConstraint('conversion_id')
    )
    with op.batch_alter_table('conversiones_auditadas', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conversiones_auditadas_campana_id'), ['campana_id'], unique=False)
    _fill_owners()


def _fill_owners() -> None:
    """The owners of the records already in the log, batch by batch in seq order (the first record
    naming a conversion's campaign wins, as live; a campaign's owner is the first one given)."""
    bind = op.get_bind()
    log = sa.table('audit_log', sa.column('seq'), sa.column('event_type'), sa.column('payload_json'),
                   sa.column('campana_id'), sa.column('conversion_id'), sa.column('anunciante_id'))
    campaigns = sa.table('campanas_auditadas', sa.column('campana_id'), sa.column('anunciante_id'))
    conversions = sa.table('conversiones_auditadas', sa.column('conversion_id'), sa.column('campana_id'))
    last = 0
    while True:
        rows = bind.execute(sa.select(log.c.seq, log.c.event_type, log.c.payload_json).where(log.c.seq > last)
                            .order_by(log.c.seq).limit(_BATCH)).all()
        if not rows:
            break
        owner_of_campaign: dict = {}
        campaign_of_conversion: dict = {}
        for seq, event_type, payload_json in rows:
            try:
                payload = json.loads(payload_json)
            except ValueError:
                continue
            campana, conversion, anunciante = _owners(event_type, payload)
            if campana or conversion or anunciante:
                bind.execute(sa.update(log).where(log.c.seq == seq).values(
                    campana_id=campana, conversion_id=conversion, anunciante_id=anunciante))
            if event_type == "CampanaCreada" and campana and owner_of_campaign.get(campana) is None:
                owner_of_campaign[campana] = anunciante
            if conversion and campana:
                campaign_of_conversion.setdefault(conversion, campana)
        known = dict(bind.execute(sa.select(campaigns.c.campana_id, campaigns.c.anunciante_id)
                                  .where(campaigns.c.campana_id.in_(list(owner_of_campaign)))).all())
        for campana, anunciante in owner_of_campaign.items():
            if campana not in known:
                bind.execute(sa.insert(campaigns).values(campana_id=campana, anunciante_id=anunciante))
            elif known[campana] is None and anunciante is not None:
                bind.execute(sa.update(campaigns).where(campaigns.c.campana_id == campana)
                             .values(anunciante_id=anunciante))
        seen = set(bind.execute(sa.select(conversions.c.conversion_id)
                                .where(conversions.c.conversion_id.in_(list(campaign_of_conversion)))).scalars())
        for conversion, campana in campaign_of_conversion.items():
            if conversion not in seen:
                bind.execute(sa.insert(conversions).values(conversion_id=conversion, campana_id=campana))
        last = rows[-1][0]


def downgrade() -> None:
    with op.batch_alter_table('conversiones_auditadas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversiones_auditadas_campana_id'))
    op.drop_table('conversiones_auditadas')
    with op.batch_alter_table('campanas_auditadas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_campanas_auditadas_anunciante_id'))
    op.drop_table('campanas_auditadas')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_anunciante_id'))
        batch_op.drop_index(batch_op.f('ix_audit_log_conversion_id'))
        batch_op.drop_index(batch_op.f('ix_audit_log_campana_id'))
        batch_op.drop_index(batch_op.f('ix_audit_log_actor_id'))
        batch_op.drop_column('anunciante_id')
        batch_op.drop_column('conversion_id')
        batch_op.drop_column('campana_id')
        batch_op.drop_column('actor_id')
        batch_op.drop_column('actor_role')
