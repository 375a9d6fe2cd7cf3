"""`python -m bot`: run the Telegram bot with the settings from the environment."""

import logging

from personabot.bot.app import run_bot

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
run_bot()
