"""Rows of the local stand-ins for the hub datasets TRL's tests load: ``zen``, ``harmony`` and ``toolcall``.

The text is written for this harness. Like the hub sets, ``zen`` is built on the 19 aphorisms of "The Zen of
Python" (PEP 20, public domain); ``harmony`` asks about the same aphorisms with a reasoning trace per answer
(gpt-oss style); ``toolcall`` has requests answered through (fictitious) tool calls. Each function here returns
``{config_name: rows}``; build_assets.py splits every config into train/test the way the hub sets are split
(the last 10 % of rows, rounded up, is the test split: 19 rows -> 17/2, 8 rows -> 7/1).
"""

from __future__ import annotations

from transformers.utils import get_json_schema

# One entry per aphorism: the aphorism split into a text prompt and its right ending, a wrong ending, a question
# about it, the right and a wrong answer, and a one-line reason for each answer (used as reasoning traces).
# fmt: off
APHORISMS = [
    ("Beautiful is better than", " ugly.", " fast.",
     "Which should code be, beautiful or ugly?", "Beautiful.", "Ugly, nobody reads it anyway.",
     "Pleasant code is easier to keep working.", "Careless code costs every later reader."),
    ("Explicit is better than", " implicit.", " obvious.",
     "Should behaviour be explicit or implicit?", "Explicit.", "Implicit, readers can guess.",
     "Stating intent removes the guesswork.", "Hidden behaviour surprises people."),
    ("Simple is better than", " complex.", " short.",
     "What beats complex?", "Simple.", "More complexity.",
     "Fewer moving parts, fewer failures.", "Piling on parts rarely helps."),
    ("Complex is better than", " complicated.", " simple.",
     "What beats complicated?", "Complex.", "Even more complicated.",
     "Structured complexity can still be understood.", "Tangles only grow."),
    ("Flat is better than", " nested.", " round.",
     "Should structures be flat or nested?", "Flat.", "Nested as deep as possible.",
     "Shallow structures are easier to follow.", "Deep nesting hides the logic."),
    ("Sparse is better than", " dense.", " empty.",
     "Is sparse or dense code preferable?", "Sparse.", "Dense, to save lines.",
     "Room to breathe helps reading.", "Cramming saves nothing worth having."),
    ("Readability", " counts.", " is optional.",
     "Does readability matter?", "Readability counts.", "Not really.",
     "Code is read far more often than written.", "Ignoring readers is a mistake."),
    ("Special cases aren't special enough to", " break the rules.", " get tests.",
     "Are special cases a reason to break the rules?", "No, they aren't special enough.", "Yes, always.",
     "Consistency is worth more than exceptions.", "Exceptions everywhere erode the rules."),
    ("Although practicality beats", " purity.", " testing.",
     "What beats purity?", "Practicality.", "More purity.",
     "Real needs come before ideals.", "Ideals alone ship nothing."),
    ("Errors should never pass", " silently.", " code review.",
     "How should errors pass?", "Never silently.", "Quietly, to avoid noise.",
     "Hidden errors cause hidden damage.", "Silence only delays the failure."),
    ("Unless explicitly", " silenced.", " ignored by accident.",
     "When may an error pass silently?", "When it is explicitly silenced.", "Whenever it is inconvenient.",
     "Silence must be a deliberate choice.", "Accidental silence is a bug."),
    ("In the face of ambiguity, refuse the temptation to", " guess.", " ask.",
     "What should you do when things are ambiguous?", "Refuse the temptation to guess.", "Guess and move on.",
     "A wrong guess is worse than a question.", "Guessing spreads confusion."),
    ("There should be one-- and preferably only one --obvious way", " to do it.", " to avoid it.",
     "How many obvious ways should there be to do something?", "One, preferably only one.", "As many as possible.",
     "One clear way keeps code uniform.", "Many ways make many styles."),
    ("Although that way may not be obvious at first unless you're", " Dutch.", " lucky.",
     "Who finds the obvious way obvious at first?", "The Dutch.", "Nobody, ever.",
     "A friendly nod to Python's author.", "That misses the joke."),
    ("Now is better than", " never.", " later.",
     "What is better than never?", "Now.", "Waiting a little longer.",
     "Starting beats endless delay.", "Delay is how never happens."),
    ("Although never is often better than", " *right* now.", " tomorrow.",
     "Is never ever better than right now?", "Often, yes.", "No, never.",
     "Rushed work can be worse than none.", "Haste is not always a virtue."),
    ("If the implementation is hard to explain, it's", " a bad idea.", " a clever idea.",
     "What does a hard-to-explain implementation tell you?", "That it is a bad idea.", "That it is brilliant.",
     "Sound ideas can be explained.", "Obscurity is not brilliance."),
    ("If the implementation is easy to explain, it", " may be a good idea.", " must be wrong.",
     "What does an easy-to-explain implementation tell you?", "That it may be a good idea.",
     "That it is too simple to work.",
     "Clarity hints at soundness.", "Simplicity is not a flaw."),
    ("Namespaces are one honking great idea --", " let's do more of those!", " let's remove them!",
     "What do you think of namespaces?", "They are one honking great idea.", "They only add typing.",
     "Namespaces keep names from colliding.", "Collisions are the real cost."),
]
# fmt: on


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def zen_configs() -> dict[str, list[dict]]:
    """The ``zen`` configs: standard and conversational versions of each dataset type TRL's tests use."""
    configs: dict[str, list[dict]] = {name: [] for name in (
        "standard_language_modeling", "conversational_language_modeling",
        "standard_prompt_only", "conversational_prompt_only",
        "standard_prompt_completion", "conversational_prompt_completion",
        "standard_preference", "conversational_preference",
        "standard_implicit_prompt_preference", "conversational_implicit_prompt_preference",
        "standard_unpaired_preference", "conversational_unpaired_preference",
        "standard_stepwise_supervision",
    )}  # fmt: skip
    for index, (prompt, good, bad, question, answer, wrong, why_good, why_bad) in enumerate(APHORISMS):
        configs["standard_language_modeling"].append({"text": prompt + good})
        configs["conversational_language_modeling"].append({"messages": [_user(question), _assistant(answer)]})
        configs["standard_prompt_only"].append({"prompt": prompt})
        configs["conversational_prompt_only"].append({"prompt": [_user(question)]})
        configs["standard_prompt_completion"].append({"prompt": prompt, "completion": good})
        configs["conversational_prompt_completion"].append(
            {"prompt": [_user(question)], "completion": [_assistant(answer)]}
        )
        configs["standard_preference"].append({"prompt": prompt, "chosen": good, "rejected": bad})
        configs["conversational_preference"].append(
            {"prompt": [_user(question)], "chosen": [_assistant(answer)], "rejected": [_assistant(wrong)]}
        )
        configs["standard_implicit_prompt_preference"].append({"chosen": prompt + good, "rejected": prompt + bad})
        configs["conversational_implicit_prompt_preference"].append(
            {"chosen": [_user(question), _assistant(answer)], "rejected": [_user(question), _assistant(wrong)]}
        )
        # Unpaired rows alternate between a desirable and an undesirable completion, so both labels occur.
        desirable = index % 2 == 0
        configs["standard_unpaired_preference"].append(
            {"prompt": prompt, "completion": good if desirable else bad, "label": desirable}
        )
        configs["conversational_unpaired_preference"].append(
            {
                "prompt": [_user(question)],
                "completion": [_assistant(answer if desirable else wrong)],
                "label": desirable,
            }
        )
        configs["standard_stepwise_supervision"].append(
            {"prompt": question, "completions": [why_good, why_bad], "labels": [True, False]}
        )
    return configs


_IDENTITY = "You are a tiny reasoning assistant used in tests."
_EFFORTS = ("low", "medium", "high")


def harmony_configs() -> dict[str, list[dict]]:
    """The ``harmony`` configs (gpt-oss): assistant turns carry ``thinking`` next to ``content``, and every row
    has ``chat_template_kwargs`` with the reasoning effort and the model identity."""
    configs: dict[str, list[dict]] = {"language_modeling": [], "prompt_completion": [], "preference": []}
    for index, (_, _, _, question, answer, wrong, why_good, why_bad) in enumerate(APHORISMS):
        kwargs = {"reasoning_effort": _EFFORTS[index % 3], "model_identity": _IDENTITY}
        chosen = {"role": "assistant", "thinking": why_good, "content": answer}
        rejected = {"role": "assistant", "thinking": why_bad, "content": wrong}
        configs["language_modeling"].append({"messages": [_user(question), chosen], "chat_template_kwargs": kwargs})
        configs["prompt_completion"].append(
            {"prompt": [_user(question)], "completion": [chosen], "chat_template_kwargs": kwargs}
        )
        configs["preference"].append(
            {"prompt": [_user(question)], "chosen": [chosen], "rejected": [rejected], "chat_template_kwargs": kwargs}
        )
    return configs


# -- toolcall: fictitious tools, described by their signatures and docstrings ----------------------------------


def convert_currency(amount: float, source: str, target: str) -> float:
    """
    Converts an amount of money from one currency to another.

    Args:
        amount: The amount of money to convert.
        source: The ISO code of the currency to convert from.
        target: The ISO code of the currency to convert to.
    """
    return amount


def get_stock_price(symbol: str) -> float:
    """
    Returns the latest trading price of a stock.

    Args:
        symbol: The ticker symbol of the stock.
    """
    return 0.0


def translate_text(text: str, language: str) -> str:
    """
    Translates a text into another language.

    Args:
        text: The text to translate.
        language: The language to translate the text into.
    """
    return text


def set_alarm(time: str) -> str:
    """
    Sets an alarm for the given time of day.

    Args:
        time: The time of day, as HH:MM on a 24-hour clock.
    """
    return time


def get_sunrise_time(city: str, date: str) -> str:
    """
    Returns the time of sunrise in a city on a date.

    Args:
        city: The city to look up.
        date: The date, as YYYY-MM-DD.
    """
    return "06:00"


def book_taxi(pickup: str, destination: str, passengers: int) -> dict:
    """
    Books a taxi ride.

    Args:
        pickup: Where the taxi should pick the passengers up.
        destination: Where the ride should end.
        passengers: How many passengers will ride.
    """
    return {}


def check_flight_status(flight_number: str) -> dict:
    """
    Returns the status of a flight.

    Args:
        flight_number: The flight number, e.g. "LH454".
    """
    return {}


def control_thermostat(room: str, temperature: float) -> dict:
    """
    Sets the target temperature of a room.

    Args:
        room: The room whose thermostat to set.
        temperature: The target temperature in degrees Celsius.
    """
    return {}


def _call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def _result(name: str, content: str) -> dict:
    return {"role": "tool", "name": name, "content": content}


def toolcall_configs() -> dict[str, list[dict]]:
    """The ``toolcall`` configs: each row has the ``tools`` it may call (JSON schemas); a preferred completion calls
    the right tool with the right arguments, reads its result and answers; a rejected one skips the tool, calls it
    with wrong arguments, or misreports the result. One request is in Chinese."""
    schema = {f.__name__: get_json_schema(f) for f in (
        convert_currency, get_stock_price, translate_text, set_alarm, get_sunrise_time, book_taxi,
        check_flight_status, control_thermostat,
    )}  # fmt: skip
    # (request, tools offered, chosen completion, rejected completion)
    # fmt: off
    cases = [
        ("How much is 250 euros in Japanese yen?", ["convert_currency", "get_stock_price"],
         [_call("convert_currency", {"amount": 250.0, "source": "EUR", "target": "JPY"}),
          _result("convert_currency", "40512.5"), _assistant("250 euros is about 40,513 yen.")],
         [_assistant("250 euros is about 250 yen.")]),
        ("What is Apple trading at right now?", ["get_stock_price"],
         [_call("get_stock_price", {"symbol": "AAPL"}), _result("get_stock_price", "227.48"),
          _assistant("Apple (AAPL) is trading at $227.48.")],
         [_call("get_stock_price", {"symbol": "APPL"}), _result("get_stock_price", "error: unknown symbol"),
          _assistant("Apple is trading at $100.")]),
        ("Translate 'good morning' into Spanish.", ["translate_text"],
         [_call("translate_text", {"text": "good morning", "language": "Spanish"}),
          _result("translate_text", "buenos días"), _assistant("In Spanish: \"buenos días\".")],
         [_call("translate_text", {"text": "good morning", "language": "Italian"}),
          _result("translate_text", "buongiorno"), _assistant("In Spanish: \"buongiorno\".")]),
        ("Wake me up at 6:45 tomorrow.", ["set_alarm", "get_sunrise_time"],
         [_call("set_alarm", {"time": "06:45"}), _result("set_alarm", "06:45"),
          _assistant("Your alarm is set for 6:45.")],
         [_call("set_alarm", {"time": "18:45"}), _result("set_alarm", "18:45"),
          _assistant("Your alarm is set.")]),
        ("When does the sun rise in Oslo on 21 June 2025?", ["get_sunrise_time"],
         [_call("get_sunrise_time", {"city": "Oslo", "date": "2025-06-21"}), _result("get_sunrise_time", "03:54"),
          _assistant("On 21 June 2025 the sun rises in Oslo at 3:54.")],
         [_assistant("The sun rises at 6:00 everywhere.")]),
        ("Get a taxi for two of us from the station to the museum.", ["book_taxi", "check_flight_status"],
         [_call("book_taxi", {"pickup": "the station", "destination": "the museum", "passengers": 2}),
          _result("book_taxi", "{'status': 'confirmed', 'eta_minutes': 7}"),
          _assistant("Your taxi for two is confirmed and arrives in about 7 minutes.")],
         [_call("book_taxi", {"pickup": "the museum", "destination": "the station", "passengers": 1}),
          _result("book_taxi", "{'status': 'confirmed', 'eta_minutes': 12}"),
          _assistant("Done.")]),
        ("Is flight LH454 on time?", ["check_flight_status"],
         [_call("check_flight_status", {"flight_number": "LH454"}),
          _result("check_flight_status", "{'status': 'delayed', 'delay_minutes': 35}"),
          _assistant("Flight LH454 is delayed by 35 minutes.")],
         [_call("check_flight_status", {"flight_number": "LH454"}),
          _result("check_flight_status", "{'status': 'delayed', 'delay_minutes': 35}"),
          _assistant("Flight LH454 is on time.")]),
        ("把卧室的温度调到二十二度。", ["control_thermostat"],
         [_call("control_thermostat", {"room": "卧室", "temperature": 22.0}),
          _result("control_thermostat", "{'room': '卧室', 'temperature': 22.0}"),
          _assistant("好的，卧室的温度已设为 22 °C。")],
         [_assistant("好的。")]),
    ]
    # fmt: on
    configs: dict[str, list[dict]] = {"language_modeling": [], "preference": []}
    for request, tool_names, chosen, rejected in cases:
        tools = [schema[name] for name in tool_names]
        configs["language_modeling"].append({"messages": [_user(request), *chosen], "tools": tools})
        configs["preference"].append({"prompt": [_user(request)], "chosen": chosen, "rejected": rejected, "tools": tools})
    return configs
