"""Closed word classes the resolver needs: pronouns with their person,
number and gender, nouns whose meaning carries a gender, honorific titles
and verbs of speaking.

Open classes (which nouns denote a person or an animal, which supersense a
verb has) come from WordNet, not from here.
"""

from __future__ import annotations

FEMALE = "female"
MALE = "male"
GROUP = "group"
UNKNOWN = "unknown"

# pronoun (lower case) -> (number, gender, form); form is "subject", "object",
# "possessive" or "reflexive".
THIRD_PERSON: dict[str, tuple[str, str, str]] = {
    "he": ("singular", MALE, "subject"),
    "him": ("singular", MALE, "object"),
    "his": ("singular", MALE, "possessive"),
    "himself": ("singular", MALE, "reflexive"),
    "she": ("singular", FEMALE, "subject"),
    "her": ("singular", FEMALE, "object"),
    "hers": ("singular", FEMALE, "possessive"),
    "herself": ("singular", FEMALE, "reflexive"),
    "they": ("plural", GROUP, "subject"),
    "them": ("plural", GROUP, "object"),
    "their": ("plural", GROUP, "possessive"),
    "theirs": ("plural", GROUP, "possessive"),
    "themselves": ("plural", GROUP, "reflexive"),
}

FIRST_PERSON_SINGULAR = frozenset({"i", "me", "my", "mine", "myself"})

RELATIVE_PRONOUNS = frozenset({"who", "whom", "that", "which", "whose"})

# Nouns whose meaning gives the gender of what they name (queen, bull,
# fisherman). Nouns that are only often used for one gender (giant, soldier,
# witch's victim "child") are absent on purpose: pronouns decide those.
FEMALE_NOUNS = frozenset(
    """
    woman women girl lass lassie maiden maid damsel lady queen princess empress duchess countess
    baroness mother stepmother grandmother granny grandma mama mamma mum mum aunt niece daughter
    stepdaughter sister stepsister wife bride widow witch sorceress enchantress fairy-godmother
    godmother nun abbess goddess heroine hostess mistress housewife dame madam madame miss mrs
    hen cow mare ewe doe vixen lioness tigress sow shepherdess milkmaid dairymaid washerwoman
    spinster nursemaid governess mermaid giantess ogress heiress songstress seamstress laundress
    waitress actress matron crone hag wench
    """.split()
)
MALE_NOUNS = frozenset(
    """
    man men boy lad youth fellow gentleman lord king prince emperor duke count earl baron knight
    father stepfather grandfather grandpa papa dad uncle nephew son stepson brother stepbrother
    husband bridegroom groom widower wizard sorcerer monk friar priest abbot god hero host master
    sir mr squire woodman huntsman fisherman ploughman herdsman nobleman gentleman beggarman
    cock rooster bull ox stallion ram buck drake gander boar tomcat merman waiter actor footman
    """.split()
)

# Titles that precede a name and give its gender.
FEMALE_TITLES = frozenset({"mrs", "mrs.", "miss", "ms", "ms.", "madam", "madame", "lady", "queen", "princess", "dame"})
MALE_TITLES = frozenset({"mr", "mr.", "sir", "lord", "king", "prince", "master", "count", "duke", "father"})

# Verbs that introduce direct speech: their subject is the speaker of the quote.
SPEECH_VERBS = frozenset(
    """
    say tell ask answer reply cry call shout scream exclaim whisper murmur mutter
    continue add begin think sing grumble growl roar sob laugh repeat declare explain
    """.split()
)

# Head nouns that WordNet files under persons or animals but that in stories
# nearly always denote something else.
NOT_CHARACTERS = frozenset(
    """
    head heart hand one thing part side kind sort nothing anything something everything
    none other others time way place world life mind body eye eyes face back foot feet
    """.split()
)

# Pronouns that take no antecedent of their own.
DEICTIC = frozenset({"you", "your", "yours", "yourself", "yourselves", "we", "us", "our", "ours", "ourselves"})
