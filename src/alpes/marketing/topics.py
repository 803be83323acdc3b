"""The topics marketing publishes on (their partitions and subscribers: alpes.contract)."""

# Advertisers (AnuncianteRegistrado/Actualizado, SecretoPostbackRotado), campaigns, enrollments,
# affiliate states, API keys and the saga's answers: what conversiones and afiliados follow to
# decide which conversions and programs count and whose postbacks they are.
MARKETING = "marketing.eventos"
# The commission lifecycle and payouts: reporting, the payment ledger and affiliate earnings.
COMISIONES = "comisiones.eventos"
