"""The privacy contract: ledger of every noise draw, accountant, budget guard, mechanisms."""
