"""Hand-written paraphrased prompts for the ``emoji`` model: how a person would ask for an emoji, not its caption.

The model was trained on captions built from emoji names (``"red apple, food & drink, food fruit"``, see
:data:`sdengine.data.emoji.CAPTION_TEMPLATES`). These prompts describe the same emoji in other words ("a face
with hearts for eyes, completely in love"), so that prompt adherence can be measured on text the model has not
seen verbatim. Each entry is ``(prompt, emoji char)``; the char is the one the prompt asks for.

- :data:`PARAPHRASES` covers many groups (faces, animals, plants, food, places, weather, transport, sport,
  objects, symbols, flags) and leaves out the held-out subgroup (``food-fruit``, see
  :data:`sdengine.train.emoji.HELD_OUT_SUBGROUP`) that the base model never saw.
- :data:`FRUIT_PARAPHRASES` are paraphrases of that held-out subgroup only, for the LoRA report.

Zero-width joiners and variation selectors inside the chars are written as escapes so they stay visible.
"""

from __future__ import annotations

__all__ = ["FRUIT_PARAPHRASES", "PARAPHRASES"]

PARAPHRASES: tuple[tuple[str, str], ...] = (
    # faces
    ("a smiling face that is crying tears of joy", "😂"),  # face with tears of joy
    ("someone laughing so hard they roll over sideways", "🤣"),  # rolling on the floor laughing
    ("a happy face wearing a golden halo like an angel", "😇"),  # smiling face with halo
    ("a face with hearts for eyes, completely in love", "😍"),  # smiling face with heart-eyes
    ("a cool guy face wearing dark shades", "😎"),  # smiling face with sunglasses
    ("a face that winks at you with one eye closed", "😉"),  # winking face
    ("a face turned upside down with a little smile", "🙃"),  # upside-down face
    ("a face slowly melting into a puddle", "🫠"),  # melting face
    ("a face sticking its tongue out and winking", "😜"),  # winking face with tongue
    ("a face putting a finger to its lips to say hush", "🤫"),  # shushing face
    ("a face with a hand on its chin, pondering something", "🤔"),  # thinking face
    ("a face with its mouth zipped shut", "🤐"),  # zipper-mouth face
    ("a face lifting one eyebrow in doubt", "🤨"),  # face with raised eyebrow
    ("a face with no mouth at all", "😶"),  # face without mouth
    ("a face rolling its eyes in annoyance", "🙄"),  # face with rolling eyes
    ("a face showing clenched teeth in an awkward way", "😬"),  # grimacing face
    ("a face whose nose grows long from telling lies", "🤥"),  # lying face
    ("a sleeping face with a bubble of z's", "😴"),  # sleeping face
    ("a sick face wearing a surgical mask", "😷"),  # face with medical mask
    ("a face with a thermometer in its mouth, running a fever", "🤒"),  # face with thermometer
    ("a green face about to throw up", "🤢"),  # nauseated face
    ("a red sweating face suffering from the heat", "🥵"),  # hot face
    ("a blue frozen face with icicles", "🥶"),  # cold face
    ("a head blowing its top off in shock", "🤯"),  # exploding head
    ("a face wearing a cowboy hat", "🤠"),  # cowboy hat face
    ("a face in a party hat blowing a noisemaker", "🥳"),  # partying face
    ("a nerdy face with thick glasses and buck teeth", "🤓"),  # nerd face
    ("a posh face peering through a monocle", "🧐"),  # face with monocle
    ("a face with big puppy-dog eyes begging", "🥺"),  # pleading face
    ("a face sobbing with streams of tears", "😭"),  # loudly crying face
    ("a face screaming in horror with hands on its cheeks", "😱"),  # face screaming in fear
    ("a face opening its mouth wide in a big yawn", "🥱"),  # yawning face
    ("a furious red face", "😡"),  # enraged face
    ("a face swearing with symbols over its mouth", "🤬"),  # face with symbols on mouth
    ("a grinning purple devil with horns", "😈"),  # smiling face with horns
    ("a human skull", "💀"),  # skull
    ("a smiling brown swirl of poop", "💩"),  # pile of poo
    ("a creepy circus clown", "🤡"),  # clown face
    ("a white sheet ghost sticking out its tongue", "👻"),  # ghost
    ("a grey alien with big black eyes", "👽"),  # alien
    ("a friendly metal robot head", "🤖"),  # robot
    ("a pixelated space invader from an arcade game", "👾"),  # alien monster
    ("a cat face laughing until it cries", "😹"),  # cat with tears of joy
    ("a monkey covering its eyes", "🙈"),  # see-no-evil monkey
    ("a monkey covering its mouth", "🙊"),  # speak-no-evil monkey
    # hearts and emotions
    ("a heart split into two pieces", "💔"),  # broken heart
    ("a heart burning with flames", "❤\ufe0f\u200d🔥"),  # heart on fire
    ("a heart pierced by cupid's arrow", "💘"),  # heart with arrow
    ("a glittering pink heart with sparkles", "💖"),  # sparkling heart
    ("a red lipstick kiss print", "💋"),  # kiss mark
    ("the number one hundred underlined twice", "💯"),  # hundred points
    ("a cartoon speech bubble", "💬"),  # speech balloon
    ("a cloud-shaped thought bubble", "💭"),  # thought balloon
    # hands and body
    ("a hand waving hello", "👋"),  # waving hand
    ("a hand giving a thumbs down", "👎"),  # thumbs down
    ("a hand giving a thumbs up, like", "👍"),  # thumbs up
    ("two hands clapping", "👏"),  # clapping hands
    ("two hands pressed together in prayer", "🙏"),  # folded hands
    ("two people shaking hands on a deal", "🤝"),  # handshake
    ("a hand making a peace sign with two fingers", "✌\ufe0f"),  # victory hand
    ("fingers crossed for good luck", "🤞"),  # crossed fingers
    ("a rock and roll hand sign with index and pinky raised", "🤘"),  # sign of the horns
    ("an arm flexing a strong muscle", "💪"),  # flexed biceps
    ("a pink brain", "🧠"),  # brain
    ("a white tooth", "🦷"),  # tooth
    ("two eyes looking to the side", "👀"),  # eyes
    ("a pair of lips", "👄"),  # mouth
    # animals
    ("a puppy's face", "🐶"),  # dog face
    ("a kitten's face with whiskers", "🐱"),  # cat face
    ("an orange fox with pointy ears", "🦊"),  # fox
    ("a lion with a big mane", "🦁"),  # lion
    ("a striped tiger's face", "🐯"),  # tiger face
    ("a white horse with a single horn on its head", "🦄"),  # unicorn
    ("a black and white striped horse", "🦓"),  # zebra
    ("a pink pig's face", "🐷"),  # pig face
    ("a tall spotted animal with a very long neck", "🦒"),  # giraffe
    ("a grey elephant with a long trunk", "🐘"),  # elephant
    ("a little hamster face", "🐹"),  # hamster
    ("a white bunny face with long ears", "🐰"),  # rabbit face
    ("a spiky little hedgehog", "🦔"),  # hedgehog
    ("a black and white bear eating bamboo", "🐼"),  # panda
    ("a grey koala from australia", "🐨"),  # koala
    ("a kangaroo hopping", "🦘"),  # kangaroo
    ("a chick hatching out of its eggshell", "🐣"),  # hatching chick
    ("a black and white penguin", "🐧"),  # penguin
    ("a wise owl with big round eyes", "🦉"),  # owl
    ("a pink bird standing on one leg", "🦩"),  # flamingo
    ("a peacock showing off its tail feathers", "🦚"),  # peacock
    ("a colourful tropical parrot", "🦜"),  # parrot
    ("a green frog's face", "🐸"),  # frog
    ("a turtle with a shell on its back", "🐢"),  # turtle
    ("a green snake slithering", "🐍"),  # snake
    ("a long-necked dinosaur", "🦕"),  # sauropod
    ("a fierce tyrannosaurus", "🦖"),  # t-rex
    ("a whale spouting water from its blowhole", "🐳"),  # spouting whale
    ("a friendly grey dolphin jumping", "🐬"),  # dolphin
    ("a puffed-up spiky fish", "🐡"),  # blowfish
    ("a purple octopus with eight arms", "🐙"),  # octopus
    ("a snail carrying its spiral shell", "🐌"),  # snail
    ("a blue butterfly with open wings", "🦋"),  # butterfly
    ("a bee that makes honey", "🐝"),  # honeybee
    ("a red ladybird with black spots", "🐞"),  # lady beetle
    ("a black spider", "🕷\ufe0f"),  # spider
    ("a desert scorpion with a stinger", "🦂"),  # scorpion
    # plants
    ("a single red rose", "🌹"),  # rose
    ("a tall yellow flower with a brown centre", "🌻"),  # sunflower
    ("a pink tulip", "🌷"),  # tulip
    ("a spiky green desert plant", "🌵"),  # cactus
    ("a tropical tree on the beach", "🌴"),  # palm tree
    ("a lucky clover with four leaves", "🍀"),  # four leaf clover
    ("an orange leaf from a canadian tree", "🍁"),  # maple leaf
    ("a red mushroom with white spots", "🍄"),  # mushroom
    # food and drink (not fruit)
    ("a green half of an avocado with its pit", "🥑"),  # avocado
    ("a purple aubergine", "🍆"),  # eggplant
    ("an orange carrot", "🥕"),  # carrot
    ("a spicy red chilli", "🌶\ufe0f"),  # hot pepper
    ("a head of broccoli", "🥦"),  # broccoli
    ("a loaf of sliced bread", "🍞"),  # bread
    ("a flaky french croissant", "🥐"),  # croissant
    ("a twisted salty pretzel", "🥨"),  # pretzel
    ("a stack of pancakes with syrup", "🥞"),  # pancakes
    ("a wedge of yellow cheese with holes", "🧀"),  # cheese wedge
    ("a cheeseburger", "🍔"),  # hamburger
    ("fries in a red carton", "🍟"),  # french fries
    ("a slice of pepperoni pizza", "🍕"),  # pizza
    ("a sausage in a bun with mustard", "🌭"),  # hot dog
    ("a mexican taco", "🌮"),  # taco
    ("a frying pan with a sunny side up egg", "🍳"),  # cooking
    ("a bowl of popcorn", "🍿"),  # popcorn
    ("a bowl of ramen noodles with chopsticks", "🍜"),  # steaming bowl
    ("a plate of pasta with tomato sauce", "🍝"),  # spaghetti
    ("a piece of sushi", "🍣"),  # sushi
    ("a chinese dumpling", "🥟"),  # dumpling
    ("a soft serve ice cream cone", "🍦"),  # soft ice cream
    ("a pink donut with sprinkles", "🍩"),  # doughnut
    ("a chocolate chip biscuit", "🍪"),  # cookie
    ("a birthday cake with candles", "🎂"),  # birthday cake
    ("a swirly lollipop", "🍭"),  # lollipop
    ("a cup of hot coffee", "☕"),  # hot beverage
    ("a glass of red wine", "🍷"),  # wine glass
    ("a martini glass with an olive", "🍸"),  # cocktail glass
    ("two beer mugs clinking together", "🍻"),  # clinking beer mugs
    ("a champagne bottle popping its cork", "🍾"),  # bottle with popping cork
    ("a cup of boba milk tea", "🧋"),  # bubble tea
    # places and weather
    ("an erupting volcano", "🌋"),  # volcano
    ("a tropical island with a palm tree", "🏝\ufe0f"),  # desert island
    ("a medieval european castle", "🏰"),  # castle
    ("the green statue in new york harbour", "🗽"),  # statue of liberty
    ("a tent at a campsite", "🏕\ufe0f"),  # camping
    ("a big wheel ride at a fair", "🎡"),  # ferris wheel
    ("a roller coaster ride", "🎢"),  # roller coaster
    ("a bright yellow sun with rays", "☀\ufe0f"),  # sun
    ("a big yellow star", "⭐"),  # star
    ("a planet with a ring around it like saturn", "🪐"),  # ringed planet
    ("a grey rain cloud", "🌧\ufe0f"),  # cloud with rain
    ("a storm cloud with a lightning bolt", "🌩\ufe0f"),  # cloud with lightning
    ("a twisting funnel of wind", "🌪\ufe0f"),  # tornado
    ("an arc of colours in the sky after rain", "🌈"),  # rainbow
    ("a blue umbrella with raindrops falling on it", "☔"),  # umbrella with rain drops
    ("a yellow lightning bolt", "⚡"),  # high voltage
    ("a six-pointed ice crystal", "❄\ufe0f"),  # snowflake
    ("a snowman covered in snow", "☃\ufe0f"),  # snowman
    ("a flame", "🔥"),  # fire
    ("a single blue drop of water", "💧"),  # droplet
    ("a big ocean wave", "🌊"),  # water wave
    ("a crescent moon at night", "🌙"),  # crescent moon
    ("a moon showing its whole bright face", "🌕"),  # full moon
    ("a shooting star streaking across the sky", "🌠"),  # shooting star
    # transport
    ("a steam train engine", "🚂"),  # locomotive
    ("a white high-speed bullet train", "🚅"),  # bullet train
    ("a yellow school bus", "🚌"),  # bus
    ("an ambulance with a siren", "🚑"),  # ambulance
    ("a red fire truck", "🚒"),  # fire engine
    ("a police patrol car", "🚓"),  # police car
    ("a yellow taxi cab", "🚕"),  # taxi
    ("a little red car", "🚗"),  # automobile
    ("a formula one racing car", "🏎\ufe0f"),  # racing car
    ("a motorbike", "🏍\ufe0f"),  # motorcycle
    ("a pedal bike", "🚲"),  # bicycle
    ("a farm tractor", "🚜"),  # tractor
    ("a small sailing boat", "⛵"),  # sailboat
    ("a big cruise ship", "🛳\ufe0f"),  # passenger ship
    ("a passenger jet plane", "✈\ufe0f"),  # airplane
    ("a helicopter with spinning blades", "🚁"),  # helicopter
    ("a rocket blasting off into space", "🚀"),  # rocket
    ("a ufo flying saucer", "🛸"),  # flying saucer
    ("a red octagonal stop sign", "🛑"),  # stop sign
    ("a traffic light standing upright", "🚦"),  # vertical traffic light
    ("a ship's anchor", "⚓"),  # anchor
    # activities and objects
    ("a football for soccer", "⚽"),  # soccer ball
    ("an orange basketball", "🏀"),  # basketball
    ("a tennis racket and ball", "🎾"),  # tennis
    ("a bowling ball knocking down pins", "🎳"),  # bowling
    ("a red boxing glove", "🥊"),  # boxing glove
    ("a golden trophy cup", "🏆"),  # trophy
    ("a gold medal for first place", "🥇"),  # 1st place medal
    ("a dart hitting the centre of a target", "🎯"),  # bullseye
    ("a black billiard ball with the number eight", "🎱"),  # pool 8 ball
    ("a fortune teller's crystal ball", "🔮"),  # crystal ball
    ("a video game controller", "🎮"),  # video game
    ("a white dice", "🎲"),  # game die
    ("a jigsaw puzzle piece", "🧩"),  # puzzle piece
    ("a cuddly teddy bear", "🧸"),  # teddy bear
    ("a painter's palette with blobs of paint", "🎨"),  # artist palette
    ("a wrapped present with a bow", "🎁"),  # wrapped gift
    ("a red party balloon", "🎈"),  # balloon
    ("a party cracker bursting with confetti", "🎉"),  # party popper
    ("a carved halloween pumpkin", "🎃"),  # jack-o-lantern
    ("a decorated christmas tree", "🎄"),  # christmas tree
    ("fireworks exploding in the night sky", "🎆"),  # fireworks
    ("a golden crown", "👑"),  # crown
    ("a diamond engagement ring", "💍"),  # ring
    ("a sparkling blue diamond", "💎"),  # gem stone
    ("a black top hat", "🎩"),  # top hat
    ("a graduation mortarboard", "🎓"),  # graduation cap
    ("an electric guitar", "🎸"),  # guitar
    ("a piano keyboard", "🎹"),  # musical keyboard
    ("a brass trumpet", "🎺"),  # trumpet
    ("a wooden string instrument played with a bow", "🎻"),  # violin
    ("over-ear headphones for listening to music", "🎧"),  # headphone
    ("a singer's microphone", "🎤"),  # microphone
    ("a smartphone", "📱"),  # mobile phone
    ("a laptop computer", "💻"),  # laptop
    ("an old floppy disk for saving files", "💾"),  # floppy disk
    ("a photo camera", "📷"),  # camera
    ("an old tv with a screen and antenna", "📺"),  # television
    ("a glowing idea light bulb", "💡"),  # light bulb
    ("a pile of books", "📚"),  # books
    ("an old rolled paper scroll", "📜"),  # scroll
    ("a bag of money with a dollar sign", "💰"),  # money bag
    ("a green dollar bill", "💵"),  # dollar banknote
    ("a letter in an envelope", "✉\ufe0f"),  # envelope
    ("a cardboard parcel", "📦"),  # package
    ("a yellow pencil", "✏\ufe0f"),  # pencil
    ("a tool with two blades for cutting paper", "✂\ufe0f"),  # scissors
    ("a red push pin", "📌"),  # pushpin
    ("a closed padlock", "🔒"),  # locked
    ("a golden key", "🔑"),  # key
    ("a tool for knocking in nails", "🔨"),  # hammer
    ("a spanner", "🔧"),  # wrench
    ("a cog wheel", "⚙\ufe0f"),  # gear
    ("a bomb with a lit fuse", "💣"),  # bomb
    ("a bow with an arrow", "🏹"),  # bow and arrow
    ("a lab instrument for looking at tiny cells", "🔬"),  # microscope
    ("a telescope for stargazing", "🔭"),  # telescope
    ("a medicine capsule", "💊"),  # pill
    ("a doctor's stethoscope", "🩺"),  # stethoscope
    ("a flushing loo", "🚽"),  # toilet
    ("a tub to take a bath in", "🛁"),  # bathtub
    ("an hourglass with sand running", "⏳"),  # hourglass not done
    ("a ringing alarm clock", "⏰"),  # alarm clock
    # symbols and flags
    ("a yellow triangle warning sign", "⚠\ufe0f"),  # warning
    ("a red circle with a line through it, forbidden", "🚫"),  # prohibited
    ("a no smoking sign", "🚭"),  # no smoking
    ("the radiation hazard symbol", "☢\ufe0f"),  # radioactive
    ("a wheelchair access sign", "♿"),  # wheelchair symbol
    ("an arrow pointing straight up", "⬆\ufe0f"),  # up arrow
    ("a plain red circle", "🔴"),  # red circle
    ("a blue square", "🟦"),  # blue square
    ("a red triangle pointing down", "🔻"),  # red triangle pointed down
    ("a black and white checkered racing flag", "🏁"),  # chequered flag
    ("a black flag with a skull and crossbones", "🏴\u200d☠\ufe0f"),  # pirate flag
    ("a rainbow pride flag", "🏳\ufe0f\u200d🌈"),  # rainbow flag
    ("white flag with a red circle in the middle", "🇯🇵"),  # flag of japan
    ("a blue and yellow flag split horizontally", "🇺🇦"),  # flag of ukraine
    ("a red flag with a white cross", "🇨🇭"),  # flag of switzerland
    ("a red and white flag with a maple leaf", "🇨🇦"),  # flag of canada
    ("stars and stripes, the american flag", "🇺🇸"),  # flag of united states
    ("a blue, white and red vertical tricolour", "🇫🇷"),  # flag of france
    ("a green, white and red vertical tricolour", "🇮🇹"),  # flag of italy
    ("a black, red and gold striped flag", "🇩🇪"),  # flag of germany
    ("a blue flag with a yellow cross", "🇸🇪"),  # flag of sweden
)

FRUIT_PARAPHRASES: tuple[tuple[str, str], ...] = (
    ("a shiny apple as red as a fire truck", "🍎"),  # red apple
    ("a crisp sour apple that is green", "🍏"),  # green apple
    ("a curved yellow fruit that monkeys love", "🍌"),  # banana
    ("a bunch of purple fruit used to make wine", "🍇"),  # grapes
    ("a big green fruit with a red juicy inside and black seeds", "🍉"),  # watermelon
    ("a sour yellow citrus", "🍋"),  # lemon
    ("a tropical fruit with a spiky crown of leaves", "🍍"),  # pineapple
    ("a red berry with little seeds on the outside", "🍓"),  # strawberry
    ("two red berries joined by their stems", "🍒"),  # cherries
    ("a fuzzy brown fruit that is green inside", "🥝"),  # kiwi fruit
    ("a small round orange citrus that is easy to peel", "🍊"),  # tangerine
    ("a hairy brown nut with white flesh and milk", "🥥"),  # coconut
)
