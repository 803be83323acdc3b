"""The topics marketing publishes on (their partitions and subscribers: alpes.contract)."""

# Campaigns, enrollments, affiliate states and the saga's answers: what conversiones and
# afiliados follow to decide which conversions and programs count.
MARKETING = "marketing.eventos"
# The commission lifecycle and payouts: reporting, the payment ledger and affiliate earnings.
COMISIONES = "comisiones.eventos"
